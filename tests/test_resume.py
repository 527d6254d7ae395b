"""An npy sink's directory belongs to one run: refused when not empty, locked while a run writes,
resumed only with the same config and source, overwritten only when asked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from run_helpers import (
    check_every_item_once,
    manifest,
    private_env,
    results,
    run,
    slow_config,
    start_run,
    wait_results,
)

from broker import ConfigError, Pipeline


def npy_config(tmp_path: Path, factor: float = 2.0, **extra: object) -> Path:
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        for i in range(5):
            np.save(data / f"x{i}.npy", np.full(3, float(i)))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": {"type": "npy", "path": str(data / "*.npy")},
        "stages": [{"name": "twice", "fn": "workers.stages:scale", "args": {"factor": factor}}],
        "sink": {"type": "npy", "path": str(tmp_path / "out")}, **extra}))
    return cfg


def test_a_resume_of_another_run_is_refused_naming_what_differs(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    cfg = npy_config(tmp_path)
    assert run(cfg, env).returncode == 0
    out = tmp_path / "out"
    m = manifest(out)
    m["complete"] = False  # as if it had been stopped
    (out / "shmbroker-run.json").write_text(json.dumps(m))

    other = run(npy_config(tmp_path, factor=3.0), env, "--resume")
    assert other.returncode == 2
    assert "cannot resume" in other.stderr and "stages[0].args.factor: 2.0 then, 3.0 now" in other.stderr
    npy_config(tmp_path)  # the config of the run again
    np.save(tmp_path / "data" / "x5.npy", np.zeros(3))
    more = run(cfg, env, "--resume")
    assert more.returncode == 2 and "the source files differ: 5 then, 6 now" in more.stderr
    (tmp_path / "data" / "x5.npy").unlink()
    np.save(tmp_path / "data" / "x2.npy", np.zeros(30))
    changed = run(cfg, env, "--resume")
    assert changed.returncode == 2 and f"source file {tmp_path / 'data' / 'x2.npy'} changed" in changed.stderr
    np.save(tmp_path / "data" / "x2.npy", np.full(3, 2.0))  # the same size, but written again
    touched = run(cfg, env, "--resume")
    assert touched.returncode == 2 and "x2.npy was modified since" in touched.stderr
    # the resources (replicas, the arena, devices, batch sizes) may change between a run and its resume
    assert run(cfg, env, "--overwrite").returncode == 0
    m = manifest(out)
    m["complete"] = False
    (out / "shmbroker-run.json").write_text(json.dumps(m))
    (out / "000004.npy").unlink()
    again = run(cfg, env, "--resume", "--json", "--set", "stages.twice.replicas=2",
                "--set", "broker.capacity=32MiB")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["items"] == 1
    np.testing.assert_array_equal(np.load(out / "000004.npy"), np.full(3, 8.0))


def test_a_run_into_a_directory_that_is_not_empty_is_refused_unless_overwrite(tmp_path: Path) -> None:
    cfg = npy_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "000099.npy", np.zeros(1))  # stale, from an earlier, longer run
    (out / "failures.jsonl").write_text('{"stage": "x", "items": [1], "error": "old"}\n')
    with Pipeline.from_yaml(cfg) as p:
        with pytest.raises(ConfigError, match=r"is not empty .* --overwrite"):
            p.run()
        summary = p.run(overwrite=True)
        assert summary.items == 5
        assert results(out) == [f"{i:06d}.npy" for i in range(5)]  # the stale file is gone
        assert not (out / "failures.jsonl").exists()  # failures.jsonl belongs to one run
        assert manifest(out)["complete"] is True
        with pytest.raises(ConfigError, match="holds the results of a finished run"):
            p.run()
        with pytest.raises(ConfigError, match="exclude each other"):
            p.run(resume=True, overwrite=True)


def test_resume_needs_an_npy_sink(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"type": "synthetic", "count": 2, "shape": [2]},
                                   "stages": [{"name": "s", "fn": "workers.stages:identity"}]}))
    with Pipeline.from_yaml(cfg) as p:
        with pytest.raises(ConfigError, match="resume needs the config's npy sink .* this run's sink is null"):
            p.run(resume=True)
        assert p.run(overwrite=True).items == 2  # nothing to overwrite: harmless


def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    cfg = slow_config(tmp_path, count=30, seconds=0.2)
    first = start_run(cfg, env)
    try:
        wait_results(tmp_path / "out", 1, first)
        for args in ((), ("--resume",), ("--overwrite",)):
            second = run(cfg, env, *args)
            assert second.returncode == 2, second.stderr
            assert f"is being written by another run (pid {first.pid}" in second.stderr
        assert first.poll() is None, "the first run ended before the second was tried"
        _out, err = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()  # reaps it and closes its pipes, whichever way the test went
    assert first.returncode == 0, err
    check_every_item_once(tmp_path / "out", 30)


def test_resume_redoes_cut_short_files_and_keeps_recorded_skips(tmp_path: Path) -> None:
    """A power cut can leave a result file short; items recorded as skipped stay settled, and
    failures.jsonl is appended to (it belongs to the one run a resume continues)."""
    cfg = tmp_path / "p.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump({
        "source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": 8}},
        "stages": [{"name": "boom", "fn": "stage_helpers:boom_on", "args": {"value": 3.0},
                    "on_error": "skip"}],
        "sink": {"type": "npy", "path": str(out)}}))
    with Pipeline.from_yaml(cfg) as p:
        p.run()
    m = manifest(out)
    assert m["source"]["type"] == "python" and "name and arguments only" in m["source"]["checked"]
    m["complete"] = False
    (out / "shmbroker-run.json").write_text(json.dumps(m))
    whole = (out / "000005.npy").read_bytes()
    (out / "000005.npy").write_bytes(whole[:-8])  # cut short
    (out / "000006.npy").unlink()
    (out / ".000007.npy.123.tmp").write_bytes(b"half")  # a write the crash interrupted
    with Pipeline.from_yaml(cfg) as p:
        summary = p.run(resume=True)
    assert summary.items == 2 and summary.resumed == 6 and summary.skipped == []  # 5, 6; not 3 again
    assert results(out) == [f"{i:06d}.npy" for i in range(8) if i != 3]
    np.testing.assert_array_equal(np.load(out / "000005.npy"), np.full(4, 50.0))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert [json.loads(x)["items"] for x in (out / "failures.jsonl").read_text().splitlines()] == [[3]]
    assert manifest(out)["complete"] is True and len(manifest(out)["resumed"]) == 1


def test_resume_with_nothing_to_resume_starts_the_run(tmp_path: Path) -> None:
    """A restarted container runs the same command: --resume must also work the first time."""
    env = private_env(tmp_path)
    cfg = slow_config(tmp_path, count=6, seconds=0.0)
    t0 = time.monotonic()
    first = run(cfg, env, "--resume")
    assert first.returncode == 0, first.stderr
    check_every_item_once(tmp_path / "out", 6)
    again = run(cfg, env, "--resume", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["items"] == 0
    assert time.monotonic() - t0 < 60
