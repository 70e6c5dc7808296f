"""The light part of the command line (no jax imported): how a command fails and whether
tracebacks were asked for."""
from __future__ import annotations

import os
import sys

HELP_ARGS = ("-h", "--help", "-help", "--h", "-?")


def fail(message: str) -> None:
    """Prints ``Error: message`` on stderr and exits 1."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def debug_requested() -> bool:
    """Whether tracebacks were asked for (``--debug`` or ``JAXDIT_DEBUG=1``)."""
    return bool(os.environ.get("JAXDIT_DEBUG"))
