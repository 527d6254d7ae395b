"""`shmbroker validate` catches what `run` would fail on at start, and says where."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker import ConfigError, Pipeline
from shmbroker.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
NPY = ROOT / "configs" / "npy_files.yaml"


def validate(capsys: pytest.CaptureFixture[str], path: Path, *sets: str) -> tuple[int, str]:
    args = ["validate", str(path)] + [x for s in sets for x in ("--set", s)]
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, expected", [
    ("source.dtype=float33", "source.dtype: Value error, unknown dtype 'float33'"),
    ("source.dtype=U10", "source.dtype: Value error, unsupported dtype 'U10'"),
    ("stages.infer.dtype=flaot16", "stages[1].dtype: Value error, unknown dtype 'flaot16'"),
    ("stages.preprocess.args.scale=3",
     "stages[0].args: workers.stages:normalize does not accept them: got an unexpected keyword argument 'scale'"),
    ("stages.infer.args.bias=3",
     "stages[1].args: workers.stages:linear does not accept them: got an unexpected keyword argument 'bias'"),
    ("stages.infer.args={}", "stages[1].args: workers.stages:linear does not accept them: missing a required argument"),
])
def test_what_run_would_fail_on_is_an_error(capsys: pytest.CaptureFixture[str], override: str,
                                            expected: str) -> None:
    code, err = validate(capsys, DEMO, override)
    assert code == 2 and expected in err, err
    assert f"--set {override}: " in err and str(DEMO) not in err  # the cause is the override


def test_source_and_sink_function_arguments_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "p.yaml"
    base = {"source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": 2}},
            "stages": [{"name": "s", "fn": "workers.stages:identity"}],
            "sink": {"type": "python", "fn": "stage_helpers:collect"}}
    cfg.write_text(yaml.safe_dump(base))
    assert validate(capsys, cfg) == (0, "")
    code, err = validate(capsys, cfg, "source.args.m=3")
    assert code == 2 and "source.args: stage_helpers:counting_source does not accept them" in err
    code, err = validate(capsys, cfg, "sink.args.scale=3")
    assert code == 2 and "sink.args: stage_helpers:collect does not accept them" in err


def test_an_unknown_start_method_is_an_error(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMBROKER_START_METHOD", "fork")
    code, err = validate(capsys, DEMO)
    assert code == 2 and "SHMBROKER_START_METHOD must be forkserver or spawn, not 'fork'" in err


def test_a_glob_that_matches_nothing_is_a_warning(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = validate(capsys, NPY, f"source.path={tmp_path}/nothing/*.npy")
    assert code == 0
    assert f"warning: source.path '{tmp_path}/nothing/*.npy' matches no files now" in err


def test_run_refuses_the_same_before_starting_anything() -> None:
    with pytest.raises(ConfigError, match="does not accept them"):
        Pipeline.from_yaml(DEMO, ["stages.preprocess.args.scale=3"])
