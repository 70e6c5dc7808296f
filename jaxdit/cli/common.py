"""What every command-line entry point shares: loading ``--config`` and turning the errors a
user can cause into one line on stderr and exit code 1 (``JAXDIT_DEBUG=1`` shows the
traceback)."""
from __future__ import annotations

import os
import sys


def fail(message: str) -> None:
    """Prints ``Error: message`` on stderr and exits 1."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def load_config(flag_values, name: str = "config"):
    """The config of a ``config_flags`` flag, or a one-line exit when its file is missing or
    does not import (ml_collections defers that failure to the first attribute access)."""
    try:
        config = getattr(flag_values, name)
        config.model  # pylint: disable=pointless-statement
    except OSError:
        spec = flag_values[name].serialize().partition("=")[2] or "?"
        fail(f"cannot load the config file {spec.split(':')[0]!r} (from --{name} {spec}): "
             "no such file, or it does not import; use path.py:<arg>, e.g. "
             "experiments/dit_air.py:tiny.")
    return config


def run_or_fail(fn, user_errors: tuple, *args, **kwargs):
    """``fn(*args, **kwargs)``; a ``user_errors`` exception becomes :func:`fail`."""
    try:
        return fn(*args, **kwargs)
    except user_errors as e:
        if os.environ.get("JAXDIT_DEBUG"):
            raise
        fail(str(e))
