"""Stage code as a new user writes it: modules next to the config or in the working directory
(no PYTHONPATH), and results made of NumPy scalars, numbers and bools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from broker import Pipeline

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# the `shmbroker` command as installed: the working directory is not on sys.path by itself
CLI = [sys.executable, "-c", "import sys; del sys.path[0]; from shmbroker.cli import main; sys.exit(main())"]


def cli(args: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the project, not the stage code
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_stage_modules_are_found_in_the_working_directory_and_next_to_the_config(tmp_path: Path) -> None:
    work, conf = tmp_path / "work", tmp_path / "conf"
    (work / "mypkg").mkdir(parents=True)
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "prep.py").write_text("def fn(x):\n    return x + 1\n")
    conf.mkdir()
    (conf / "nextdoor.py").write_text("def fn(x):\n    return x * 10\n")
    cfg = conf / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": {"type": "synthetic", "count": 3, "shape": [2], "dtype": "float64"},
        "stages": [{"name": "prep", "fn": "mypkg.prep:fn"}, {"name": "ten", "fn": "nextdoor:fn"}],
        "sink": {"type": "npy", "path": str(tmp_path / "out")}}))
    out = cli(["run", str(cfg), "--no-progress"], cwd=work)
    assert out.returncode == 0, out.stderr
    rng = np.random.default_rng(0)
    for i in range(3):
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"{i:06d}.npy"),
                                   (rng.standard_normal([2]) + 1) * 10)


def test_a_stage_module_that_is_nowhere_says_where_it_was_looked_for(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = conf / "p.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"type": "synthetic", "count": 1, "shape": [2]},
                                   "stages": [{"name": "prep", "fn": "mypkg.prep:fn"}]}))
    out = cli(["validate", str(cfg)], cwd=tmp_path)
    assert out.returncode == 2
    assert "no module named 'mypkg'" in out.stderr and "stages[0].fn" in out.stderr
    looked = out.stderr.split("looked in:", 1)[1]
    assert str(conf) in looked and str(tmp_path) in looked
    assert "next to the config file or in the working directory" in out.stderr


def test_stages_may_return_numpy_scalars_numbers_and_bools(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"type": "synthetic", "count": 1, "shape": [3]},
                                   "stages": [{"name": "d", "fn": "stage_helpers:scalars_in_dict"}]}))
    arrays = [np.array([1.0, 2.0, 6.0], np.float32), np.array([-4.0, 0.0, 1.0], np.float32)]
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map(arrays))
    for a, d in zip(arrays, got, strict=True):
        assert d["mean"].shape == () and d["mean"].dtype == np.float32 and d["mean"] == a.mean()
        assert d["max"] == a.max() and d["n"] == 3 and d["n"].dtype == np.int64
        assert d["positive"].dtype == np.bool_ and bool(d["positive"]) == bool(a.sum() > 0)
        np.testing.assert_array_equal(d["x2"], a * 2)
    for fn, check in (("stage_helpers:mean_only", lambda a, r: r.shape == () and r == a.mean()),
                      ("stage_helpers:scalars_in_tuple",
                       lambda a, r: r[0] == a[0] and r[0].dtype == np.float64 and r[1] == a.sum()
                       and r[2].dtype == np.bool_ and bool(r[2]))):
        cfg.write_text(yaml.safe_dump({"source": {"type": "synthetic", "count": 1, "shape": [3]},
                                       "stages": [{"name": "s", "fn": fn, "batch": 1}]}))
        with Pipeline.from_yaml(cfg) as p:
            for a, r in zip(arrays, p.map(arrays), strict=True):
                assert check(a, r), (fn, a, r)
