"""The `shmbroker` command as a new user meets it: help that lists everything, keys that are not
overwritten by accident, --set that can unset and that is named in its errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from broker import ConfigError
from shmbroker.cli import _parser, main
from shmbroker.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_top_level_help_lists_every_command_in_plain_text() -> None:
    text = _parser().format_help()
    for name in commands():
        assert f"\n    {name} " in text, name
    for markup in ("``", ":class:", ":func:", ".. "):
        assert markup not in text


def test_every_option_has_help() -> None:
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in commands().items()
               for a in p._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []


def test_keys_are_not_replaced_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "keys"
    assert main(["keys", str(d)]) == 0
    first = (d / "broker.key_secret").read_bytes()
    assert main(["keys", str(d)]) == 2
    err = capsys.readouterr().err
    assert "already holds keys" in err and "pass --force to replace them" in err
    assert (d / "broker.key_secret").read_bytes() == first
    assert main(["keys", str(d), "--force"]) == 0
    assert (d / "broker.key_secret").read_bytes() != first


def test_set_null_unsets_a_key(tmp_path: Path) -> None:
    assert load_config(DEMO).stages[1].batch == 8
    assert load_config(DEMO, ["stages.infer.batch=null"]).stages[1].batch == 1  # the default
    assert load_config(DEMO, ["stages.infer.batch=~"]).stages[1].batch == 1
    assert [s.name for s in load_config(DEMO, ["stages[0]=null"]).stages] == ["infer"]
    assert load_config(DEMO, ["sink=null"]).sink.type == "null"  # the default sink
    assert load_config(DEMO, ["sink={type: null}"]).sink.type == "null"


def test_an_error_caused_by_set_names_the_override_not_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["stages.infer.batch=0"])
    text = str(err.value)
    assert text.startswith("--set stages.infer.batch=0: stages[1].batch: Input should be greater than")
    assert str(DEMO) not in text
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["broker.capacity=100TiB"])
    assert str(err.value).startswith("--set broker.capacity=100TiB: broker.capacity: 100.0 TiB is more than")
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("replicas: 2", "replicas: -1"))
    with pytest.raises(ConfigError) as err:  # an error the override did not cause names the file
        load_config(bad, ["stages.infer.batch=4"])
    assert str(err.value).startswith(f"{bad}: stages[0].replicas: Input should be greater than")
