"""What every command-line entry point shares: its ``--help`` (the command's own flags and
an example, not absl's 200 lines), flag parsing whose errors are one line, loading
``--config``, and turning the errors a user can cause into one line on stderr and exit
code 1 (``--debug`` on any command, or ``JAXDIT_DEBUG=1``, shows the traceback)."""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxdit.cli.console import HELP_ARGS, debug_requested, fail
from jaxdit.errors import ConfigError
from jaxdit.models.registry import check_set_fields

def command_name(module: str) -> str:
    """``jaxdit.cli.train`` -> ``jaxdit train``."""
    return "jaxdit " + module.rsplit(".", 1)[-1]


def help_text(module: str, usage: str) -> str:
    """``usage`` (the module docstring: what it does and examples), then the flags defined
    by ``module`` with their one-line help and defaults."""
    own = flags.FLAGS.module_help(module).split("\n", 2)[-1]  # drop the module-name header
    lines = [usage.strip(), "", "Flags:", own.rstrip()]
    if "--config" in own:
        lines += ["  --config.<field>=<value>: override any field of the config, e.g. "
                  "--config.train.steps=200"]
    lines += ["  --debug: show the Python traceback of an error",
              f"All flags, absl's own included: {command_name(module)} --helpfull"]
    return "\n".join(lines)


def _config_override_error(argv: list[str], error: Exception) -> str:
    """One line for a ``--config.a.b=v`` that names no field (ml_collections raises an
    ``AttributeError`` wrapping a ``KeyError`` whose text holds a suggestion)."""
    inner = error.args[0] if error.args else error
    text = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner)
    field, _, hint = text.partition("\n")
    field = field.strip("'\"")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                 and a.split("=")[0].endswith("." + field)), "--config.<field>")
    return (f"{flag}: the config has no field {field!r}. {hint}".strip()
            + " Every field and its default: jaxdit/config_lib.py (docs/config.md).")


def _flag_value_error(message: str, name: str) -> str:
    """One line for absl's ``IllegalFlagValueError``: a missing required flag, a config
    file's own error (its last traceback line) or a value of the wrong type."""
    missing = re.search(r"Flag (--\w+) must have a value other than None", message)
    if missing:
        return f"{missing.group(1)} is required; `{name} --help` lists the flags."
    head, _, rest = message.partition(": Error whilst parsing config file:")
    if rest:
        last = [ln for ln in rest.strip().splitlines() if ln.strip()][-1]
        return f"{head.removeprefix('flag ')}: {last.partition(': ')[2] or last}"
    return message.removeprefix("flag ")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parse of ``argv`` whose errors (unknown flags, config typos, wrong types,
    unknown config sizes) end the program with one line; the positional arguments left."""
    if "--debug" in argv:
        os.environ["JAXDIT_DEBUG"] = "1"
        argv = [a for a in argv if a != "--debug"]
    name = command_name(argv[0]) if argv[0].startswith("jaxdit.") else "the command"
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        if debug_requested():
            raise
        fail(f"unknown flag --{e.flagname}; `{name} --help` lists the flags.")
    except flags.IllegalFlagValueError as e:
        if debug_requested():
            raise
        fail(_flag_value_error(str(e), name))
    except flags.Error as e:
        if debug_requested():
            raise
        fail(f"{e}; `{name} --help` lists the flags.")
    except (AttributeError, KeyError) as e:  # --config.x.y=v naming no field
        if debug_requested():
            raise
        fail(_config_override_error(argv, e))
    return []


def reject_stray(argv: list[str], module: str) -> None:
    """Fails naming any positional argument (flags are ``--name value``)."""
    if len(argv) > 1:
        fail(f"unexpected argument(s) {' '.join(argv[1:])!r}: every option is a flag "
             f"(--name value or --name=value); `{command_name(module)} --help` lists them.")


def run_app(main, module: str, usage: str) -> None:
    """``absl.app.run(main)`` with this module's ``--help`` and one-line flag errors."""
    if any(a in HELP_ARGS for a in sys.argv[1:]):
        print(help_text(module, usage))
        sys.exit(0)
    sys.argv[0] = module  # names the command in parse_flags' messages
    app.run(main, flags_parser=parse_flags)


def load_config(flag_values, name: str = "config"):
    """The config of a ``config_flags`` flag, or a one-line exit when its file is missing or
    does not import (ml_collections defers that failure to the first attribute access) or
    when a ``--config.<field>`` override sets a field the model family does not read."""
    try:
        config = getattr(flag_values, name)
        config.model  # pylint: disable=pointless-statement
    except OSError:
        spec = flag_values[name].serialize().partition("=")[2] or "?"
        fail(f"cannot load the config file {spec.split(':')[0]!r} (from --{name} {spec}): "
             "no such file, or it does not import; use path.py:<arg>, e.g. "
             "experiments/dit_air.py:tiny.")
    overridden = config_flags.get_override_values(flag_values[name])
    try:  # a --config.<field> the model family does not read would silently do nothing
        check_set_fields(config.model.family, [k for k in overridden if "." in k])
    except ConfigError as e:
        fail(f"--config.{e}")
    return config


def run_or_fail(fn, user_errors: tuple, *args, **kwargs):
    """``fn(*args, **kwargs)``; a ``user_errors`` exception (or an :class:`app.UsageError`)
    becomes :func:`fail`."""
    try:
        return fn(*args, **kwargs)
    except (app.UsageError, *user_errors) as e:
        if debug_requested():
            raise
        fail(str(e))
