"""Ahead-of-time TPU compiles from the CPU host (libtpu describes the topology; nothing
runs): the tiny DiT-Air train step with splash attention compiles for a v5p slice with its
Mosaic kernels, and the reports and errors of ``jaxdit.compile`` are what they say."""
import json
import os
import subprocess
import sys

import pytest

from jaxdit.train import aot
from helpers import preset


@pytest.mark.parametrize("name,expected", [
    ("v5p-8", ("v5p:2x2x1", 4)), ("v5p-16", ("v5p:2x2x2", 8)), ("v5p-128", ("v5p:4x4x4", 64)),
    ("v5p-1024", ("v5p:8x8x8", 512)), ("v5p:2x2x4", ("v5p:2x2x4", 16)),
    ("v5e-16", ("v5e:4x4", 16)), ("v6e-8", ("v6e:2x4", 8)), ("v6e:4x4", ("v6e:4x4", 16))])
def test_topology_names(name, expected):
    chip, topo, chips = aot.parse_topology(name)
    assert (topo, chips) == expected and chip.hbm_gib in (95.0, 16.0, 32.0)


@pytest.mark.parametrize("name", ["v4-8", "v5p-12", "v5p:2x2", "v5p-2"])
def test_bad_topology_names_are_refused(name):
    with pytest.raises(aot.AOTError):
        aot.parse_topology(name)


def test_missing_libtpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(aot.AOTError, match=r'pip install -e "\.\[tpu\]"'):
        aot.topology_devices("v5p:2x2x1")


@pytest.mark.xdist_group("aot")
def test_tiny_dit_air_train_step_compiles_for_v5p_with_splash():
    cfg = preset("dit_air", "tiny")
    cfg.model.update(attn_impl="splash", depth=3, scan_layers=True)
    r = aot.compile_train_step(cfg, "v5p:2x2x1", batch=8)
    assert r.chips == 4 and r.mesh["fsdp"] == 4 and r.batch == 8
    assert r.mosaic_kernels > 0  # splash compiled by Mosaic, not interpreted
    assert 0 < r.argument_bytes < 64 * 2 ** 20 and r.temp_bytes > 0 and r.fits
    assert r.alias_bytes > 0  # the donated state is updated in place
    assert r.flops_per_chip > 1e8 and r.optimal_seconds > 0 and 0 < r.estimated_mfu < 1
    assert cfg.train.batch_size == 32 and cfg.text.kind == "trainable"  # cfg is not edited
    # libtpu's start-up settings do not leak: a child process must not think it is on a TPU VM
    assert "TPU_ACCELERATOR_TYPE" not in os.environ
    # XLA's cost analysis counts a scanned body once; the extrapolated estimate of the
    # scanned step matches the cost of the same step unrolled
    cfg.model.scan_layers = False
    unrolled = aot.compile_train_step(cfg, "v5p:2x2x1", batch=8)
    assert unrolled.cost_source == "the compiled program" != r.cost_source
    assert abs(r.flops_per_chip / unrolled.flops_per_chip - 1) < 0.05


@pytest.mark.xdist_group("aot")
def test_compile_command_reports_and_refuses_bad_input(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxdit.compile", "--config", "experiments/dit_air.py:tiny"]
    bad = subprocess.run(cmd + ["--topology", "v9x-8"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "--topology 'v9x-8'" in bad.stderr.strip().splitlines()[-1]
    out = tmp_path / "plan.json"
    ok = subprocess.run(cmd + ["--topology", "v5p-8", "--batch", "8", "--config.model.depth=1",
                               "--config.model.scan_layers=False", "--json", str(out)],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "fits" in ok.stdout and "compiler estimates" in ok.stdout
    report = json.loads(out.read_text())[0]
    assert report["fits"] and report["batch"] == 8 and "optimal_seconds" in report["estimates"]


def test_find_batch_doubles_then_bisects_to_the_largest_fitting_multiple(monkeypatch):
    """The search logic alone (each probe would be a real compile): HBM grows with the batch,
    the chip holds 1000 units; batches are multiples of 8."""
    tried = []

    def fake_compile(cfg, topology, *, batch, remat):
        tried.append(batch)
        chip = aot.Chip("test", 1000 / aot.GIB, 1.0, 1)
        return aot.CompileReport(topology, chip, 8, {}, batch, remat, 0.0, 0.0, 10 * batch, 0,
                                 0, 0, 0, 0.0, 0.0, 0)

    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    best = aot.find_batch(None, "v5p-8", "full", start=16, divisor=8, log=lambda *_: None)
    assert best.batch == 96 and best.fits  # 96 * 10 <= 1000 < 104 * 10
    assert tried[:4] == [16, 32, 64, 128] and all(b % 8 == 0 for b in tried)
    monkeypatch.setattr(aot, "compile_train_step", lambda *a, batch, remat: fake_compile(
        None, "", batch=batch * 1000, remat=remat))
    assert aot.find_batch(None, "v5p-8", "full", start=8, divisor=8,
                          log=lambda *_: None) is None  # not even the smallest fits
