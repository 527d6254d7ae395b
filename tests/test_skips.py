"""Items a stage skips (``on_error: skip``): never silently missing from map(), logged once with
exactly the items that failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from broker import Pipeline, Skipped, StageFailed

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def skipping_cfg(tmp_path: Path, **extra: object) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": 8}},
        "stages": [{"name": "boom", "fn": "stage_helpers:boom_on", "args": {"value": 3.0},
                    "on_error": "skip"}], **extra}))
    return cfg


def test_map_raises_at_a_skipped_item_by_default(tmp_path: Path) -> None:
    arrays = [np.full(4, float(i)) for i in range(8)]
    got = []
    with Pipeline.from_yaml(skipping_cfg(tmp_path)) as p, \
            pytest.raises(StageFailed, match=r"stage 'boom' skipped item 3 .*boom on 3\.0.*on_skip='marker'"):
        for r in p.map(arrays):
            got.append(float(r[0]))
    assert got == [0.0, 10.0, 20.0]  # the results before it came first


def test_map_with_markers_yields_one_result_per_input(tmp_path: Path) -> None:
    arrays = [np.full(4, float(i)) for i in range(8)]
    with Pipeline.from_yaml(skipping_cfg(tmp_path)) as p:
        got = list(p.map(arrays, on_skip="marker"))
        with pytest.raises(ValueError, match="on_skip"):
            list(p.map(arrays, on_skip="drop"))
    assert len(got) == len(arrays)
    assert got[3] == Skipped(3, "boom", "RuntimeError: boom on 3.0")
    assert [float(r[0]) for i, r in enumerate(got) if i != 3] == [10.0 * i for i in range(8) if i != 3]


def test_a_skipped_item_is_logged_once_with_exactly_its_index(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = skipping_cfg(tmp_path, sink={"type": "npy", "path": str(out)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    res = subprocess.run([sys.executable, "-m", "shmbroker", "run", str(cfg), "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "boom on 3.0" in ln or "skipped" in ln]
    assert len(lines) == 1, res.stderr
    assert "stage 'boom' skipped item 3: RuntimeError: boom on 3.0" in lines[0]
    assert str(out / "failures.jsonl") in lines[0]
    records = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert [r["items"] for r in records] == [[3]]
    assert sorted(p.name for p in out.glob("*.npy")) == [f"{i:06d}.npy" for i in range(8) if i != 3]
