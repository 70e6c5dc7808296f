"""The ``jaxdit`` command as a new user meets it: ``--help`` lists each command's own flags,
and every mistake (a stray argument, a config typo, an unknown size, a missing flag, a value
of the wrong type, an unknown command) is one line on stderr, exit code 1, no traceback and
nothing written. Each case stops before anything compiles."""
import os
import subprocess
import sys

import pytest

from jaxdit import config_doc
from jaxdit.errors import ConfigError
from jaxdit.eval.sampling import default_grid_path
from jaxdit.models.registry import FAMILY_FIELDS
from jaxdit.train.metrics import format_duration
from helpers import preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jaxdit(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXDIT_DEBUG")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "jaxdit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_jaxdit_lists_its_commands():
    proc = _jaxdit()
    assert proc.returncode == 2
    for command in ("train", "sample", "eval", "compile", "convert", "cache"):
        assert f"  {command} " in proc.stdout + proc.stderr, command
    bad = _jaxdit("trian")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "trian" in bad.stderr


def test_help_lists_the_commands_own_flags():
    proc = _jaxdit("sample", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--workdir", "--prompt", "--label", "--out", "--num_per_prompt", "--debug"):
        assert flag in proc.stdout, flag
    assert "jaxdit sample --workdir" in proc.stdout  # the usage line and its examples
    assert "--alsologtostderr" not in proc.stdout and len(proc.stdout.splitlines()) < 80


TINY = ["--config", "experiments/dit_air.py:tiny"]


@pytest.mark.parametrize("args, message", [
    (["eval", "--workdir", "{wd}", "[--all_steps]"],
     "unexpected argument(s) '[--all_steps]': every option is a flag"),
    (["train", *TINY, "--workdir", "{wd}", "--config.train.stepz=5"],
     "--config.train.stepz: the config has no field 'stepz'. Did you mean \"steps\""),
    (["train", "--config", "experiments/dit_air.py:huge", "--workdir", "{wd}"], "huge"),
    (["train", *TINY], "--workdir is required; `jaxdit train --help` lists the flags."),
    (["train", *TINY, "--workdir", "{wd}", "--config.train.steps=many"], "many"),
    (["train", "--config", "experiments/lumina.py:tiny", "--workdir", "{wd}",
      "--config.model.share=full"], "--config.model.share: model.family='lumina' does not use"),
], ids=["stray-argument", "config-typo", "unknown-size", "missing-flag", "wrong-type",
        "another-family's-field"])
def test_user_errors_are_one_line(tmp_path, args, message):
    wd = str(tmp_path / "wd")
    proc = _jaxdit(*(a.format(wd=wd) for a in args))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert not os.path.exists(wd)  # nothing left behind


def test_format_duration():
    assert [format_duration(s) for s in (9, 75.2, 3725)] == ["9s", "1m15s", "1h02m"]


def test_default_grid_path_never_overwrites(tmp_path):
    first = default_grid_path(str(tmp_path), 30)
    assert first == str(tmp_path / "samples" / "sampled_step_0000030.png")
    os.makedirs(os.path.dirname(first))
    open(first, "wb").close()
    assert default_grid_path(str(tmp_path), 30).endswith("sampled_step_0000030_1.png")


def test_config_reference_is_current():
    """docs/config.md's field reference is what ``python -m jaxdit.config_doc`` writes."""
    page = config_doc.PAGE.read_text(encoding="utf-8")
    assert config_doc.render(page) == page, "run: python -m jaxdit.config_doc"


def test_fields_of_another_family_are_refused():
    """A model field the family does not read (e.g. DiT-Air's ``share`` on Lumina) would do
    nothing: refused in the config argument, naming the family that has it."""
    with pytest.raises(ConfigError, match=r"model.share: model.family='lumina' does not use "
                                          r"it \(used by dit_air\)"):
        preset("lumina", "tiny,share=full")
    with pytest.raises(ConfigError, match="model.num_kv_heads.*used by lumina"):
        preset("mmdit", "tiny,num_kv_heads=2")
    assert preset("dit_air", "tiny,share=full").model.share == "full"


def test_every_model_field_belongs_to_a_family():
    """The families' field lists name real fields, and no field is read by no family."""
    fields = set(preset("d2it", "tiny").model.keys())
    listed = set().union(*FAMILY_FIELDS.values())
    assert listed <= fields, listed - fields
    assert fields <= listed, fields - listed
