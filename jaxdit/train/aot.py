"""Ahead-of-time compilation of the real train step for a TPU slice, from any host.

libtpu (``pip install -e ".[tpu]"``) describes a TPU topology without the hardware
(``jax.experimental.topologies``); lowering and compiling :func:`jaxdit.train.step.train_step`
on a mesh of its devices runs the real XLA:TPU compiler (Mosaic kernels included) and
returns per-chip memory and cost analyses. Everything is abstract: no array is allocated
and nothing runs, so a 512-chip slice compiles on a laptop.

Reported numbers are the compiler's: HBM per chip from ``memory_analysis()`` (a
measurement of the compiled program's buffers), FLOPs and ``optimal_seconds`` from its cost
model (an estimate, not a measured step time); the MFU is that estimate against the chip's
bf16 peak.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies

from jaxdit.config_lib import editable
from jaxdit.models.registry import family_of
from jaxdit.parallel.mesh import batch_sharding, mesh_axes, slice_axes
from jaxdit.train.loop import Experiment

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip facts used in reports: HBM and dense bf16 peak."""
    name: str
    hbm_gib: float
    bf16_tflops: float
    cores_per_chip: int  # slice names count TensorCores ("v5p-128" = 64 chips)


CHIPS = {"v5p": Chip("TPU v5p", 95.0, 459.0, 2), "v5e": Chip("TPU v5e", 16.0, 197.0, 1),
         "v6e": Chip("TPU v6e", 32.0, 918.0, 1)}


class AOTError(ValueError):
    """A topology, batch or install problem of an ahead-of-time compile (a user error)."""


def _grid(chips: int, dims: int) -> str:
    """The physical grid of a slice of ``chips`` chips, as libtpu names it: v5p (3-D) from
    2x2x1 (4 chips, v5p-8) on, v5e/v6e (2-D) from 1x1, doubling the smallest axis (ties:
    the last) -> 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; 2x2, 2x4, 4x4, ..."""
    if chips < 1 or chips & (chips - 1):
        raise AOTError(f"{chips} chips: slice sizes are powers of two.")
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    if chips < math.prod(shape):
        raise AOTError(f"{chips} chips: the smallest v5p slice is v5p-8 (2x2x1, 4 chips).")
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return "x".join(str(s) for s in shape)


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """``"v5p-128"`` (slice name, TensorCores), ``"v5p:4x4x4"``, ``"v5e-16"`` or
    ``"v6e:4x4"`` -> ``(chip, libtpu topology name, chips)``."""
    m = re.fullmatch(r"(v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", name.strip())
    if not m:
        raise AOTError(f"--topology {name!r}: use a slice name (v5p-128, v5e-16, v6e-16) or "
                       "a grid (v5p:4x4x4, v5e:4x4).")
    gen, count, grid = m.groups()
    chip = CHIPS[gen]
    dims = 3 if gen == "v5p" else 2
    if count:
        cores = int(count)
        if cores % chip.cores_per_chip:
            raise AOTError(f"{name}: {gen} slices count {chip.cores_per_chip} cores per chip.")
        grid = _grid(cores // chip.cores_per_chip, dims)
    if len(grid.split("x")) != dims:
        raise AOTError(f"{name}: a {gen} grid has {dims} dimensions.")
    return chip, f"{gen}:{grid}", math.prod(int(g) for g in grid.split("x"))


def topology_devices(topology_name: str):
    """The (hardware-less) devices of a TPU topology; needs libtpu."""
    if importlib.util.find_spec("libtpu") is None:
        raise AOTError('TPU compiles need libtpu, which is not installed: pip install -e ".[tpu]" '
                       "(it brings the libtpu that matches the installed jax).")
    # A compile-only client: it must not take libtpu's one-process-per-host lock, which
    # would refuse a second compile (or a TPU VM's running training) on the same host, nor
    # look for TPU VM metadata (libtpu prints a page of warnings when it finds none). Set
    # only while libtpu starts: left in the environment, they would make child processes
    # (and jaxdit.parallel.distributed) believe they run on a TPU VM.
    gen, _, grid = topology_name.partition(":")
    cores = math.prod(int(g) for g in grid.split("x")) * CHIPS[gen].cores_per_chip
    quiet = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
             "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": f"{gen}-{cores}"}
    added = {k: v for k, v in quiet.items() if k not in os.environ}
    os.environ.update(added)
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices
    except Exception as e:  # pylint: disable=broad-except
        first = str(e).splitlines()[0] if str(e) else ""
        raise AOTError(f"libtpu cannot describe TPU topology {topology_name!r}: "
                       f"{type(e).__name__}: {first}") from e
    finally:
        for key in added:
            os.environ.pop(key, None)


def with_cached_inputs(cfg, text_len: int | None = None):
    """The large-run regime: the step reads cached latents (``latent.kind=identity`` at the
    latent resolution) and cached text features (``text.kind=precomputed``) instead of
    encoding images and captions. D2iT and the autoencoders keep their image inputs (their
    encoder is part of what they train or route with). Edits ``cfg`` in place."""
    if family_of(cfg).role != "denoiser":
        return cfg
    size = cfg.data.image_size // max(cfg.latent.downsample, 1)
    cfg.latent.update(kind="identity", downsample=1)
    cfg.data.update(image_size=size, source="shapes")
    if cfg.text.kind != "none":
        cfg.text.update(kind="precomputed", max_len=text_len or cfg.text.max_len)
    return cfg


def example_host_batch(cfg, batch: int) -> dict:
    """``name -> (shape, dtype)`` of one global train batch of ``cfg``'s inputs."""
    s, c = cfg.data.image_size, cfg.latent.channels
    if cfg.latent.kind != "identity":
        c = 3
    out = {"image": ((batch, s, s, c), np.float32)}
    if cfg.text.kind == "none":
        out["label"] = ((batch,), np.int32)
    elif cfg.text.kind == "precomputed":
        n, w = cfg.text.max_len, cfg.text.width
        out.update(text_tokens=((batch, n, w), np.float32), text_mask=((batch, n), np.bool_),
                   text_pooled=((batch, cfg.text.pooled_width or w), np.float32))
    else:
        n = cfg.text.max_len
        out.update(text_ids=((batch, n), np.int32), text_mask=((batch, n), np.bool_))
    return out


def compile_mesh(cfg, chips: int) -> dict[str, int]:
    """The mesh to compile for: the config's own when it shards parameters (a ``preset``, or
    ``fsdp`` > 1, resolved over ``chips``), else what a preset gives a slice: fsdp over
    every chip, with the config's ``tensor`` and ``expert`` sizes (the default mesh is pure
    data parallelism, which replicates the optimizer state on every chip)."""
    axes = mesh_axes(cfg.mesh)
    if int(axes.get("fsdp", 1)) != 1 and not cfg.mesh.preset:
        return dict(axes)
    return slice_axes(chips, int(axes.get("tensor", 1)), int(axes.get("expert", 1)))


@dataclasses.dataclass
class CompileReport:
    """What one AOT compile of the train step measured (bytes per chip) and estimated."""
    topology: str
    chip: Chip
    chips: int
    mesh: dict
    batch: int
    remat: str
    lower_s: float
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops_per_chip: float
    optimal_seconds: float
    mosaic_kernels: int  # Pallas kernels compiled by Mosaic (splash attention) in the program
    cost_source: str = "the compiled program"  # where flops / optimal_seconds come from

    @property
    def total_bytes(self) -> int:
        """Peak HBM the program needs per chip: inputs + outputs not aliased to inputs +
        temporaries + code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.chip.hbm_gib * GIB

    @property
    def estimated_mfu(self) -> float:
        """XLA's FLOPs over its estimated step time, against the bf16 peak (an estimate)."""
        if self.optimal_seconds <= 0:
            return float("nan")
        return self.flops_per_chip / self.optimal_seconds / (self.chip.bf16_tflops * 1e12)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["chip"] = self.chip.name
        mfu = self.estimated_mfu
        out.update(total_bytes=self.total_bytes, fits=self.fits, hbm_bytes=int(
            self.chip.hbm_gib * GIB), estimated_mfu=None if math.isnan(mfu) else mfu,
            estimates=["flops_per_chip", "optimal_seconds", "estimated_mfu"])
        return out


def abstract_batch(exp: Experiment, batch: int) -> dict:
    """``ShapeDtypeStruct`` s (sharded over the batch axes) of one global train batch."""
    out = {}
    for name, (shape, dtype) in example_host_batch(exp.config, batch).items():
        out[name] = jax.ShapeDtypeStruct(shape, dtype,
                                         sharding=batch_sharding(exp.mesh, len(shape)))
    return out


def lower_and_compile(cfg, devices) -> tuple[Any, float, float, Experiment]:
    """Lowers and compiles ``cfg``'s train step on ``devices`` at ``train.batch_size``, all
    abstract. Returns ``(compiled, lower seconds, compile seconds, experiment)``."""
    exp = Experiment(cfg, devices)
    state = exp.abstract_state()
    inputs = abstract_batch(exp, cfg.train.batch_size)
    with exp.context():
        t0 = time.perf_counter()
        lowered = exp.jit_train_step(inputs).lower(state, inputs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1, exp


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def _flops_and_seconds(compiled) -> tuple[float, float]:
    cost = _cost(compiled)
    return float(cost.get("flops", 0.0)), float(cost.get("optimal_seconds", 0.0))


def depth_extrapolated_cost(cfg, devices) -> tuple[float, float]:
    """``(FLOPs per chip, optimal seconds)`` of ``cfg``'s step at its ``model.depth``, from
    two small unrolled compiles: XLA's cost analysis counts a while loop's body once, so a
    scanned step reports the cost of one layer. With ``d`` the family's smallest depth
    (``Family.min_depth``: 1, or D2iT's ``refine_depth + 1``),
    ``cost(N) = cost(d) + (N - d) * (cost(d + 1) - cost(d))``; every other stack (refiners,
    grain model) is unrolled in both and counted in full."""
    depth = int(cfg.model.depth)
    d = family_of(cfg).min_depth(cfg.model)
    costs = []
    for n in (d, d + 1):
        small = editable(cfg)
        small.model.update(depth=n, scan_layers=False)
        costs.append(_flops_and_seconds(lower_and_compile(small, devices)[0]))
    (f0, t0), (f1, t1) = costs
    if min(t0, t1) <= 0:  # no usable time estimate for this program
        return f0 + (depth - d) * (f1 - f0), 0.0
    return f0 + (depth - d) * (f1 - f0), t0 + (depth - d) * (t1 - t0)


def compile_train_step(cfg, topology: str, *, batch: int | None = None,
                       remat: str | None = None) -> CompileReport:
    """AOT-compiles ``cfg``'s train step for ``topology`` (see :func:`parse_topology`) at
    global ``batch`` (default ``train.batch_size``) and ``remat`` (default the config's),
    with cached-feature inputs (:func:`with_cached_inputs`). ``cfg`` is copied, not edited.
    A scanned step's cost estimates come from :func:`depth_extrapolated_cost`."""
    cfg = with_cached_inputs(editable(cfg))
    chip, topo_name, chips = parse_topology(topology)
    devices = topology_devices(topo_name)
    with cfg.unlocked():
        cfg.train.batch_size = int(batch or cfg.train.batch_size)
        cfg.mesh = type(cfg.mesh)(compile_mesh(cfg, chips))
        if remat is not None:
            cfg.model.remat = remat
    compiled, lower_s, compile_s, exp = lower_and_compile(cfg, devices)
    mem = compiled.memory_analysis()
    if cfg.model.scan_layers:
        flops, seconds = depth_extrapolated_cost(cfg, devices)
        source = "extrapolated from unrolled compiles at two small depths"
    else:
        (flops, seconds), source = _flops_and_seconds(compiled), "the compiled program"
    return CompileReport(
        topology=topo_name, chip=chip, chips=chips, mesh=dict(exp.mesh.shape),
        batch=cfg.train.batch_size, remat=str(cfg.model.remat), lower_s=lower_s,
        compile_s=compile_s, argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes), flops_per_chip=flops,
        optimal_seconds=seconds, cost_source=source,
        mosaic_kernels=compiled.as_text().count('custom_call_target="tpu_custom_call"'))


def find_batch(cfg, topology: str, remat: str, start: int, divisor: int,
               log=print) -> CompileReport | None:
    """The report of the largest global batch (a multiple of ``divisor``) that fits per
    chip with ``remat``: doubles from ``start`` until a batch does not fit, then bisects.
    None if even ``divisor`` does not fit."""
    def attempt(b):
        r = compile_train_step(cfg, topology, batch=b, remat=remat)
        log(f"  remat={remat} batch {b}: {r.total_bytes / GIB:.1f} GiB per chip "
            f"({'fits' if r.fits else 'does not fit'}, compile {r.compile_s:.0f}s)")
        return r
    lo, hi, best = 0, None, None
    b = max(divisor, start // divisor * divisor)
    while hi is None:
        r = attempt(b)
        if r.fits:
            lo, best, b = b, r, b * 2
        else:
            hi = b
    while hi - lo > divisor:
        mid = (lo + hi) // 2 // divisor * divisor
        if mid <= lo:
            break
        r = attempt(mid)
        if r.fits:
            lo, best = mid, r
        else:
            hi = mid
    return best


def report_lines(r: CompileReport) -> list[str]:
    """The human-readable summary of one compile."""
    g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    hbm = r.chip.hbm_gib
    return [
        f"{r.chip.name} {r.topology} ({r.chips} chips), mesh "
        + " ".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) + f", global batch "
        f"{r.batch}, remat={r.remat}",
        f"lower {r.lower_s:.1f}s, compile {r.compile_s:.1f}s, {r.mosaic_kernels} Mosaic "
        "kernel calls",
        f"HBM per chip: arguments {g(r.argument_bytes)}, temporaries {g(r.temp_bytes)}, "
        f"outputs {g(r.output_bytes)} ({g(r.alias_bytes)} aliased to arguments), code "
        f"{g(r.code_bytes)}; total {g(r.total_bytes)} of {hbm:.0f} GiB: "
        + ("fits" if r.fits else "DOES NOT FIT"),
        f"compiler estimates (XLA cost model, {r.cost_source}; not measurements): "
        f"{r.flops_per_chip / 1e12:.2f} TFLOP per chip per step, "
        + (f"step {r.optimal_seconds * 1e3:.1f} ms, MFU {r.estimated_mfu:.1%} of "
           f"{r.chip.bf16_tflops:.0f} TFLOP/s bf16" if r.optimal_seconds > 0 else
           "no step-time estimate (the cost model returned none for this program)"),
    ]
