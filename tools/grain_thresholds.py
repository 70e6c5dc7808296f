"""Entropy percentiles of a dataset's regions for D2iT's grain maps.

  python tools/grain_thresholds.py --config experiments/d2it.py:dvae-tiny \
      --num_images 5000 --out thresholds.json

Writes ``{"percentiles": {"1": ..., "99": ...}, "region": r, "bins": b, "sigma": s,
"num_regions": n}`` computed with the DVAE's own entropy function; point
``--config.dvae.thresholds_file`` at it (the threshold for ``dvae.fine_ratio`` is read
from the table).
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from jaxdit.data.grains import dataset_entropies, percentile_table, threshold_for_ratio
from jaxdit.models.dvae import region_size

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
flags.DEFINE_integer("num_images", 5000, "Training images to read.")
flags.DEFINE_string("out", "grain_thresholds.json", "Output JSON path.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = _CONFIG.value
    ent = dataset_entropies(config, FLAGS.num_images)
    table = percentile_table(ent)
    d = config.dvae
    out = {"percentiles": table, "region": region_size(config.vae.ch_mult), "bins": int(d.bins),
           "sigma": float(d.sigma), "num_regions": int(ent.size)}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    thr = threshold_for_ratio(table, float(d.fine_ratio))
    print(f"{ent.size} regions; p25 {table['25']:.4f} p50 {table['50']:.4f} "
          f"p75 {table['75']:.4f}; fine_ratio {d.fine_ratio} -> threshold {thr:.4f} "
          f"(realised {(ent > thr).mean():.3f}); wrote {FLAGS.out}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
