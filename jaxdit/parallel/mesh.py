"""Device mesh construction and the single logical-axis rules table.

Every parameter and activation in jaxdit is annotated with *logical* axis names
(``embed``, ``mlp``, ``heads``, ``batch`` ...). ``LOGICAL_RULES`` maps them onto the
*mesh* axes ``data``/``fsdp``/``tensor``/``expert``/``sequence``. Changing the parallelism
strategy means changing the mesh shape in the config, never the model code.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")

# Logical name -> mesh axes. One table for every model family.
LOGICAL_RULES = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mod", "tensor"),  # AdaLN modulation outputs (6d)
    ("expert", "expert"),
    ("vocab", None),
    ("text_embed", None),
    ("patch", None),
    ("norm", None),
    ("layers", None),
    ("pos", None),
    ("cond", None),
    ("conv_in", None),  # convolutional autoencoder weights (replicated)
    ("conv_out", None),
    ("embed_out", None),  # second dim of a square (d, d) kernel whose first dim is "embed"
)


class MeshConfigError(ValueError):
    """Raised for a mesh config that cannot be realised on the available devices."""


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in one ``-1`` axis and checks the product equals ``num_devices``.

    Args:
      axis_sizes: mesh axis name -> size (``-1`` for "whatever is left", at most one).
      num_devices: number of devices the mesh must cover.
    Returns:
      Dict over ``MESH_AXES`` (missing axes get size 1).
    """
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise MeshConfigError(f"Unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}.")
    sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshConfigError(f"At most one mesh axis may be -1, got {free}.")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise MeshConfigError(f"Mesh axis sizes must be positive or -1, got {sizes}.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise MeshConfigError(
                f"Mesh {sizes}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} available devices.")
        sizes[free[0]] = num_devices // known
    elif known != num_devices:
        raise MeshConfigError(
            f"Mesh {sizes} multiplies to {known} devices but {num_devices} are available. "
            "Make the sizes multiply to the device count or set one axis to -1.")
    return sizes


# TPU v5p slices are named by TensorCores ("v5p-128" = 64 chips); each chip is one JAX
# device (megacore). Presets shard parameters and optimizer state over every chip (fsdp),
# with ``tensor`` kept from the config (e.g. 4 for the largest models) and the batch over
# fsdp x data; ``data=-1`` absorbs several slices (multi-slice over DCN).
V5P_SLICES = {f"v5p-{cores}": cores // 2 for cores in (8, 16, 32, 64, 128, 256, 512, 1024,
                                                        2048, 4096, 8192, 12288)}


def preset_axes(preset: str, tensor: int = 1, expert: int = 1) -> dict[str, int]:
    """Axis sizes for a named slice (see :data:`V5P_SLICES`): fsdp over the slice's chips
    divided by ``tensor`` and ``expert``, data over slices."""
    if preset not in V5P_SLICES:
        raise MeshConfigError(f"Unknown mesh preset {preset!r}; available: {sorted(V5P_SLICES)}.")
    return slice_axes(V5P_SLICES[preset], tensor, expert, name=preset)


def slice_axes(chips: int, tensor: int = 1, expert: int = 1, name: str = "") -> dict[str, int]:
    """Axis sizes for one slice of ``chips`` chips: fsdp over ``chips / (tensor * expert)``,
    ``data=-1`` for however many slices run together."""
    if chips % (tensor * expert):
        raise MeshConfigError(f"{name or 'The slice'} has {chips} chips, not divisible by "
                              f"tensor={tensor} x expert={expert}.")
    return dict(data=-1, fsdp=chips // (tensor * expert), tensor=tensor, expert=expert,
                sequence=1)


def mesh_axes(mesh_cfg: Mapping) -> dict[str, int]:
    """``config.mesh`` -> axis sizes: the explicit sizes, or ``preset`` when it is set."""
    cfg = dict(mesh_cfg)
    preset = cfg.pop("preset", "")
    if not preset:
        return cfg
    return preset_axes(preset, cfg.get("tensor", 1), cfg.get("expert", 1))


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``Mesh`` with axes ``MESH_AXES`` (Auto axis types, so linen constraints work);
    ``axis_sizes`` may be a ``config.mesh`` with a ``preset`` (:func:`mesh_axes`)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_axes(axis_sizes), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        try:  # Topology-aware device order on real accelerators.
            from jax.experimental import mesh_utils
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # pylint: disable=broad-except
            arr = np.asarray(devices).reshape(shape)
    else:
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """Maps a tree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_RULES) -> NamedSharding:
    """Sharding for a host batch array: leading dim over the batch axes, rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def logical_mesh_axes(logical: str, axis_sizes: Mapping[str, int],
                      rules=LOGICAL_RULES) -> tuple[str, ...]:
    """Mesh axes the ``logical`` axis is split over under ``rules`` (those with more than one
    device), in sharding order. ``axis_sizes``: a mesh's ``shape``, concrete or abstract."""
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    axes = (spec,) if isinstance(spec, str) else (spec or ())
    return tuple(a for a in axes if axis_sizes.get(a, 1) > 1)


def batch_mesh_axes(axis_sizes: Mapping[str, int], rules=LOGICAL_RULES) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (:func:`logical_mesh_axes` of
    ``batch``)."""
    return logical_mesh_axes("batch", axis_sizes, rules)


def batch_divisor(mesh: Mesh, rules=LOGICAL_RULES) -> int:
    """How many ways the batch dimension is split (global batch must be a multiple)."""
    return math.prod(mesh.shape[a] for a in batch_mesh_axes(mesh.shape, rules))


def target_platform() -> str:
    """The platform the program being traced is for: that of the mesh in context (e.g.
    ``"tpu"`` for a TPU topology compiled ahead of time from a CPU host), else the default
    backend. Kernel choices (Mosaic vs interpret mode, ``auto``) follow it."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
