"""Block stacks: ``n`` blocks of one class applied in sequence, unrolled or scanned.

Unrolled (``scan=False``), block ``i`` is the submodule ``{prefix}_{i}``. Scanned
(``scan=True``, MaxText's ``scan_layers``), one ``nn.scan`` over the block runs all ``n``:
its parameters (and the ``moe_state`` / sown collections) live under ``{prefix}_scan`` with a
leading axis of size ``n`` and the logical name ``layers``, and the compiler sees the block
once, so compile time no longer grows with depth. :func:`stack_unrolled` /
:func:`unstack_scanned` convert parameter trees between the two layouts (converters and
tests use them), so a scanned model computes exactly what the unrolled one does.

Every block ``__call__(carry, *args) -> carry``; ``carry`` is one array or a tuple of arrays
(MMDiT's two streams). ``in_axes[j] = 0`` marks ``args[j]`` as per-layer (a leading axis of
size ``n``; layer ``i`` sees ``args[j][i]``), ``None`` as the same for every layer.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.models.base import remat_block

# Collections a forward pass may write that are per-step outputs, not model state.
TRANSIENT_COLLECTIONS = ("aux_loss", "deep_pred", "moe_metrics", "intermediates")
# Collections a block may hold besides ``params``: scanned, they stack on the layer axis.
LAYER_COLLECTIONS = ("moe_state",) + TRANSIENT_COLLECTIONS
LAYERS_AXIS = "layers"


def scanned_name(prefix: str) -> str:
    """Name of the scanned stack whose unrolled blocks are ``{prefix}_0 .. {prefix}_{n-1}``."""
    return f"{prefix}_scan"


@functools.cache
def _carry_form(cls, collect: bool = False):
    """``cls`` whose ``__call__`` returns ``(carry, None)`` (or ``(carry, carry)`` when
    ``collect``: every layer's output), the form ``nn.scan`` wants."""
    class Carry(cls):
        def __call__(self, carry, *args):
            out = super().__call__(carry, *args)
            return out, (out if collect else None)

    Carry.__name__ = Carry.__qualname__ = cls.__name__
    return Carry


def _layer_slice(args, in_axes, i: int):
    return tuple(jax.tree.map(lambda a: a[i], arg) if ax == 0 else arg
                 for arg, ax in zip(args, in_axes))


def apply_stack(cls, n: int, prefix: str, carry, *args, in_axes: Sequence[int | None] = (),
                scan: bool = False, remat: bool | str = "none", shared: bool = False,
                collect: bool = False, **fields: Any):
    """``carry`` through ``n`` blocks ``cls(**fields)``; call from a compact method.

    ``shared=True`` reuses one block's parameters for every layer (DiT-Air-Lite's full
    sharing): the module is ``shared_{prefix}`` in both layouts, without a layer axis.
    Returns the final carry, or with ``collect`` ``(final carry, [output of each layer])``
    (the hidden states a text encoder returns).
    """
    in_axes = tuple(in_axes) + (None,) * (len(args) - len(in_axes))
    if n == 0:
        return (carry, []) if collect else carry
    if not scan:
        block_cls = remat_block(cls, remat)
        if shared:
            block = block_cls(name=f"shared_{prefix}", **fields)
            blocks = [block] * n
        else:
            blocks = [block_cls(name=f"{prefix}_{i}", **fields) for i in range(n)]
        outputs = []
        for i, block in enumerate(blocks):
            carry = block(carry, *_layer_slice(args, in_axes, i))
            outputs.append(carry)
        return (carry, outputs) if collect else carry
    per_layer = {c: 0 for c in LAYER_COLLECTIONS}
    if shared:
        variables = dict(variable_broadcast="params", variable_axes=per_layer,
                         split_rngs={"params": False})
    else:
        variables = dict(variable_axes={"params": 0, **per_layer}, split_rngs={"params": True},
                         metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    body = remat_block(_carry_form(cls, collect), remat, prevent_cse=False)
    scan_axes = tuple(nn.broadcast if ax is None else ax for ax in in_axes)
    scanned = nn.scan(body, length=n, in_axes=scan_axes, **variables)
    name = f"shared_{prefix}" if shared else scanned_name(prefix)
    carry, stacked = scanned(name=name, **fields)(carry, *args)
    if collect:
        return carry, [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]
    return carry


def _block_index(key: str, prefix: str) -> int | None:
    m = re.fullmatch(rf"{re.escape(prefix)}_(\d+)", key)
    return int(m.group(1)) if m else None


def stack_unrolled(tree: dict, prefix: str, n: int | None = None) -> dict:
    """Unrolled layout -> scanned: the subtrees ``{prefix}_0 .. {prefix}_{n-1}`` of ``tree``
    (one level of a params / variables dict) become ``{prefix}_scan`` with each leaf
    stacked on a new leading axis. ``n`` (default: every index found) must be contiguous
    from 0; blocks past ``n`` (e.g. MMDiT's distinct last block) stay as they are."""
    found = sorted(i for i in (_block_index(k, prefix) for k in tree) if i is not None)
    n = len(found) if n is None else n
    if found[:n] != list(range(n)):
        raise ValueError(f"Blocks {prefix}_0..{prefix}_{n - 1} expected, found indices {found}.")
    if n == 0:
        return dict(tree)
    out = {k: v for k, v in tree.items()
           if (i := _block_index(k, prefix)) is None or i >= n}
    out[scanned_name(prefix)] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                             *[tree[f"{prefix}_{i}"] for i in range(n)])
    return out


def unstack_scanned(tree: dict, prefix: str) -> dict:
    """Scanned layout -> unrolled (the inverse of :func:`stack_unrolled`)."""
    key = scanned_name(prefix)
    if key not in tree:
        return dict(tree)
    stacked = tree[key]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != key}
    for i in range(n):
        out[f"{prefix}_{i}"] = jax.tree.map(lambda a: a[i], stacked)
    return out


def stack_flat_like(flat: dict, expected: dict) -> dict:
    """Flat ``"a/b/c" -> array`` params in the unrolled layout -> the layout of
    ``expected`` (the model's flat ``path -> shape-bearing leaf``): every
    ``.../{prefix}_scan/rest`` it holds, with a layer axis of ``n``, is built by stacking
    ``.../{prefix}_{i}/rest`` for ``i < n`` (the converters write the unrolled layout and
    call this to fit a scanned model; blocks past ``n`` stay unrolled)."""
    layers_of = {}
    for key, leaf in expected.items():
        parts = key.split("/")
        for j, part in enumerate(parts):
            if part.endswith("_scan"):
                layers_of["/".join(parts[:j + 1])] = leaf.shape[0]
    out = dict(flat)
    for scan_path, n in layers_of.items():
        parent, _, name = scan_path.rpartition("/")
        pattern = re.compile(re.escape(parent + "/" if parent else "")
                             + re.escape(name[:-len("_scan")]) + r"_(\d+)/(.+)")
        groups: dict[str, dict[int, Any]] = {}
        for key in list(out):
            m = pattern.fullmatch(key)
            if m and int(m.group(1)) < n:
                groups.setdefault(m.group(2), {})[int(m.group(1))] = out.pop(key)
        for rest, layers in groups.items():
            if sorted(layers) != list(range(n)):
                raise ValueError(f"{scan_path}/{rest}: the state dict has layers "
                                 f"{sorted(layers)}, the model {n}.")
            out[f"{scan_path}/{rest}"] = np.stack([np.asarray(layers[i]) for i in range(n)])
    return out


def unstack_tree(tree):
    """Every ``{prefix}_scan`` subtree anywhere in ``tree`` -> its unrolled blocks
    ``{prefix}_0 ..`` (the inverse of the scanned layout at every level)."""
    if not isinstance(tree, dict):
        return tree
    for key in [k for k in tree if isinstance(k, str) and k.endswith("_scan")]:
        tree = unstack_scanned(tree, key[:-len("_scan")])
    return {k: unstack_tree(v) for k, v in tree.items()}


def relayout_like(tree: dict, like: dict) -> dict:
    """A params / variables ``tree`` in either layout (scanned or unrolled, per stack) ->
    the layout of ``like``: a checkpoint written by a scanned run loads into an unrolled
    model and the other way round."""
    return stack_tree_like(unstack_tree(tree), like)


def stack_tree_like(tree: dict, like: dict) -> dict:
    """A nested params / variables ``tree`` in the unrolled layout -> the layout of ``like``
    (e.g. the abstract params of the scanned model): :func:`stack_flat_like` on nested
    dicts."""
    def flat(t):
        return {"/".join(k): v for k, v in flatten_dict(t).items()}
    stacked = stack_flat_like(flat(tree), flat(like))
    return unflatten_dict({tuple(k.split("/")): v for k, v in stacked.items()})
