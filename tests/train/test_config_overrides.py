"""Every field of every config can be overridden from the command line, None-valued ones and `=None` included."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from longjax import cli, run

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
# Files starting with "_" are helpers the configs import (configs/_lra.py), not configs.
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def _parse(path, *overrides):
    """The config as `python -m longjax.train --config=path overrides...` would see it."""
    argv, nones = cli.split_none_overrides(["prog", f"--config={path}", *overrides])
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    cli.apply_nones(config.value, nones)
    return config.value


def _fields(config, prefix=""):
    """(dotted path, value, declared type) of every leaf field; a placeholder's type is its declared one."""
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, config.get_ref(key).get_type()


def _changed(value, kind):
    """Another value of the field's type (tuples: the first leaf changed)."""
    if value is None:
        return {int: 7, float: 0.5, str: "xla", bool: True}[kind]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, tuple):
        return (_changed(value[0], type(value[0])),) + value[1:]
    raise AssertionError(f"no override rule for {value!r}")


def _flag_text(value) -> str:
    return value if isinstance(value, str) else repr(value)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_field_of_every_config_can_be_overridden(path):
    fields = list(_fields(_parse(path)))
    assert len(fields) > 30
    for name, value, kind in fields:
        new = _changed(value, kind)
        assert new != value
        overridden = _parse(path, f"--config.{name}={_flag_text(new)}")
        got = overridden
        for part in name.split("."):
            got = got[part]
        assert got == new, (name, value, new, got)


@pytest.mark.parametrize("name", ["eval.every_steps", "eval.max_chars", "model.attention.impl", "init_from"])
def test_fields_whose_default_is_none_take_values(name):
    demo = CONFIG_DIR / "demo.py"
    value = "pallas" if name.endswith("impl") else "/runs/base" if name == "init_from" else 1000
    config = _parse(demo, f"--config.{name}={value}")
    got = config
    for part in name.split("."):
        got = got[part]
    assert got == value


def test_equals_none_sets_a_field_to_none():
    config = _parse(CONFIG_DIR / "enwik8_small.py", "--config.eval.max_chars=None", "--config.eval.every_steps=None")
    assert config.eval.max_chars is None and config.eval.every_steps is None
    plan = run.parse(config)
    assert plan.eval.max_chars is None and plan.eval.every_steps is None
    # Where None is not allowed, the plan says so, naming the field.
    config = _parse(CONFIG_DIR / "enwik8_small.py", "--config.log_every_steps=None")
    with pytest.raises(run.ConfigError, match=r"log_every_steps must be a positive int, got None"):
        run.parse(config)
    with pytest.raises(run.ConfigError, match=r"--config.eval.max_char=None: the config has no field eval.max_char"):
        _parse(CONFIG_DIR / "enwik8_small.py", "--config.eval.max_char=None")
