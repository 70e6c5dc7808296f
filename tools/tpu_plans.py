"""The TPU plans of docs/tpu_plans.md: every paper config AOT-compiled for its pod.

  python tools/tpu_plans.py                      # all (tens of minutes on 2 cores)
  python tools/tpu_plans.py --only dit_air_B,lumina_2B --json_dir plans/

Compiles each plan with :func:`jaxdit.train.aot.compile_train_step` (what
``python -m jaxdit.compile`` runs) and prints one markdown table: fits, per-chip HBM,
compile time and the compiler's estimates (step time, MFU: estimates, not measurements).
``--from_json DIR`` renders the table from ``python -m jaxdit.compile --json`` files instead.
"""
from __future__ import annotations

import glob
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxdit import config_lib  # noqa: E402
from jaxdit.train import aot  # noqa: E402

FLAGS = flags.FLAGS
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")
flags.DEFINE_list("only", [], "Plan names to compile (default: all).")
flags.DEFINE_string("json_dir", None, "Also write each report to DIR/<name>.json.")
flags.DEFINE_string("from_json", None, "Render the table from DIR/*.json instead.")

# name -> ((experiment, its argument), topology, config overrides)
PLANS = {
    "dit_air_S": (("dit_air", "S"), "v5p-256", {}),
    "dit_air_B": (("dit_air", "B"), "v5p-256", {}),
    "dit_air_L": (("dit_air", "L"), "v5p-256", {}),
    "dit_air_XL": (("dit_air", "XL"), "v5p-256", {}),
    "dit_air_XL_unrolled": (("dit_air", "XL"), "v5p-256",
                            {"model.scan_layers": False}),
    "dit_air_XXL": (("dit_air", "XXL"), "v5p-256", {}),
    "dit_air_B_lite_attn": (("dit_air", "B,share=attention"),
                            "v5p-256", {}),
    "dit_air_B_lite_full": (("dit_air", "B,share=full"),
                            "v5p-256", {}),
    "pixart_B": (("pixart", "B"), "v5p-256", {}),
    "mmdit_B": (("mmdit", "B"), "v5p-256", {}),
    "race_XL_4in32": (("race_dit", "XL-4in32"), "v5p-128", {"mesh.expert": 4}),
    "lumina_2B": (("lumina", "2B"), "v5p-128", {}),
    "lumina_7B": (("lumina", "7B"), "v5p-256", {}),
    "d2it_XL": (("d2it", "XL"), "v5p-64", {}),
    # what the remat policy costs: the fastest policies that still fit
    "dit_air_XL_remat_none": (("dit_air", "XL"), "v5p-256",
                              {"model.remat": "none"}),
    "lumina_7B_remat_dots": (("lumina", "7B"), "v5p-256",
                             {"model.remat": "dots"}),
}


def plan_config(name: str):
    (experiment, arg), topology, overrides = PLANS[name]
    cfg = config_lib.preset(experiment, arg, EXPERIMENTS)
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return cfg, topology


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| plan | topology | mesh | batch | layers | remat | Mosaic | HBM / chip | fits | "
             "compile | est. step | est. MFU |", "|---" * 12 + "|"]
    for name, r in rows:
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        estimated = r["optimal_seconds"] > 0
        step = f"{r['optimal_seconds'] * 1e3:.1f} ms" if estimated else "n/a"
        mfu = f"{r['estimated_mfu']:.0%}" if estimated else "n/a"
        layers = "unrolled" if name.endswith("_unrolled") else "scanned"
        lines.append(f"| {name} | {r['topology']} | {mesh} | {r['batch']} | {layers} | "
                     f"{r['remat']} | {r['mosaic_kernels']} | "
                     f"{r['total_bytes'] / aot.GIB:.1f} GiB | {'yes' if r['fits'] else 'NO'} | "
                     f"{r['lower_s'] + r['compile_s']:.0f} s | {step} | {mfu} |")
    return "\n".join(lines)


def main(argv):
    del argv
    jax.config.update("jax_threefry_partitionable", True)
    rows = []
    if FLAGS.from_json:
        for path in sorted(glob.glob(os.path.join(FLAGS.from_json, "*.json"))):
            name = os.path.basename(path)[:-len(".json")]
            rows.append((name, json.load(open(path))[0]))
    else:
        for name in FLAGS.only or list(PLANS):
            cfg, topology = plan_config(name)
            report = aot.compile_train_step(cfg, topology).as_dict()
            print(f"{name}: compiled in {report['compile_s']:.0f} s", flush=True)
            rows.append((name, report))
            if FLAGS.json_dir:
                os.makedirs(FLAGS.json_dir, exist_ok=True)
                with open(os.path.join(FLAGS.json_dir, f"{name}.json"), "w") as f:
                    json.dump([report], f, indent=1)
    order = {n: i for i, n in enumerate(PLANS)}
    rows.sort(key=lambda nr: order.get(nr[0], len(order)))
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
