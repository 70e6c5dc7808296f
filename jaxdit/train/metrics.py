"""Metric sinks: TensorBoard event files, a JSON-lines log and a console progress line."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from tensorboardX import SummaryWriter


class MetricWriter:
    """Writes scalars to ``<workdir>/tb`` (TensorBoard) and ``<workdir>/metrics.jsonl``."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        for k, v in scalars.items():
            if math.isfinite(float(v)):  # e.g. an empty timestep bin is NaN; keep it in jsonl
                self.tb.add_scalar(k, float(v), step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
                         + "\n")
        self.jsonl.flush()

    def close(self):
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3725`` -> ``1h02m``; ``9`` -> ``9s``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """One console line per ``every`` steps (``\\r``-updated on a terminal)."""

    def __init__(self, total: int, every: int, batch_size: int):
        self.total, self.every, self.batch = total, max(every, 1), batch_size
        self.tty = sys.stdout.isatty()
        self.t0, self.last_step = time.perf_counter(), None

    def update(self, step: int, metrics: dict):
        if step % self.every and step != self.total:
            return None
        now = time.perf_counter()
        if self.last_step is None:
            rate = {}
        else:
            dt = (now - self.t0) / max(step - self.last_step, 1)
            rate = {"step_time_ms": 1e3 * dt, "images_per_s": self.batch / dt}
        self.t0, self.last_step = now, step
        width = len(str(self.total))
        bar_len = 20
        filled = int(bar_len * step / max(self.total, 1))
        parts = [f"[{'#' * filled}{'.' * (bar_len - filled)}] {step:>{width}}/{self.total}",
                 f"loss {float(metrics['loss']):.4f}"]
        if rate:
            parts += [f"{rate['step_time_ms']:.1f} ms/step", f"{rate['images_per_s']:.1f} img/s",
                      f"ETA {format_duration(dt * (self.total - step))}"]
        line = " | ".join(parts)
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)
        return rate

    def close(self):
        if self.tty:
            print()
