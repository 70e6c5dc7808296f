"""The ``jaxdit`` command: ``jaxdit <command> [flags]``, one subcommand per entry point.

Each subcommand is the module that ``python -m jaxdit.<command>`` runs; only the chosen one
is imported (each defines its own absl flags, several of them ``--config``: importing them
all would define those twice).
"""
from __future__ import annotations

import importlib
import sys

from jaxdit.cli.console import HELP_ARGS, fail

COMMANDS = {
    "train": ("jaxdit.cli.train", "train a model from a config (resumes its workdir)"),
    "sample": ("jaxdit.cli.sample", "draw a sample grid from a run's checkpoint"),
    "eval": ("jaxdit.cli.eval", "validation loss, alignment score (and FID) of checkpoints"),
    "compile": ("jaxdit.cli.compile", "compile a train step for a TPU slice: memory, FLOPs"),
    "convert": ("jaxdit.cli.convert", "convert diffusers weights to a params checkpoint"),
    "cache": ("jaxdit.cli.cache", "precompute latents and text features for training"),
}

USAGE = "\n".join(
    ["usage: jaxdit <command> [flags]   (jaxdit <command> --help: its flags and examples)",
     "", "commands:"]
    + [f"  {name:<9}{text}" for name, (_, text) in COMMANDS.items()]
    + ["", "example: jaxdit train --config experiments/dit_air.py:tiny --workdir workdirs/tiny"])


def main(argv: list[str] | None = None) -> None:
    """Runs ``jaxdit <command> ...``: the command's ``run()`` with the rest of ``argv``."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in HELP_ARGS + ("help",):
        print(USAGE)
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        fail(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)} "
             "(`jaxdit --help`).")
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"jaxdit {name}"] + argv[2:]
    module.run()
