"""Config validation: every error names the file, the key path and what was expected; device planning with faked GPU counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker import arena
from broker.errors import ConfigError
from shmbroker.config import StageConfig, load_config, parse_size
from shmbroker.plan import plan_devices

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "name": "x",
    "broker": {"capacity": "64MiB"},
    "source": {"type": "synthetic", "count": 2, "shape": [2]},
    "stages": [{"name": "a", "fn": "workers.stages:scale"}, {"name": "b", "fn": "workers.stages:identity"}],
    "sink": {"type": "null"},
}


def cfg_file(tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in changes.items():
        node = raw
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is KeyError:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("changes, expected", [
    ({"stages__1__device": "gpu"}, "stages[1].device: Value error, expected cpu, cuda, cuda:N or auto"),
    ({"stages__0__replicas": "two"}, "stages[0].replicas: Input should be a valid integer"),
    ({"stages__0__colour": "red"}, "stages[0].colour: Extra inputs are not permitted"),
    ({"sink__type": "s3"}, "sink: Input tag 's3' found using 'type' does not match"),
    ({"source__count": -1}, "source.count: Input should be greater than or equal to 0"),
    ({"broker__capacity": "lots"}, "broker.capacity:"),
    ({"stages": []}, "stages: List should have at least 1 item"),
    ({"stages__1__name": "a"}, "stage names must be unique; repeated: ['a']"),
    ({"stages__0__fn": "nope"}, "stages[0].fn: Value error, expected module:function"),
    ({"source": KeyError}, "source: Field required"),
    ({"broker__endpoint": "tcp://0.0.0.0:5555"}, "is not loopback; set allow_remote: true"),
])
def test_errors_name_file_and_key_path(tmp_path: Path, changes: dict, expected: str) -> None:
    path = cfg_file(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unimportable_stage_function_fails_before_anything_starts(tmp_path: Path) -> None:
    from shmbroker.plan import check_imports

    path = cfg_file(tmp_path, stages__1__fn="no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match=r"stages\[1\]\.fn: cannot import 'no_such_module_xyz:fn'"):
        check_imports(load_config(path), path)
    path = cfg_file(tmp_path, stages__0__fn="workers.stages:no_such_fn")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.fn: cannot import"):
        check_imports(load_config(path), path)


def test_capacity_beyond_host_or_cgroup_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shmbroker.config.host_memory_limit", lambda: (32 * 2**20, "the container's memory limit"))
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file(tmp_path))
    text = str(err.value)
    assert "broker.capacity: 64.0 MiB is more than the 32.0 MiB available" in text
    assert "container" in text


def test_cgroup_limit_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(path: str) -> int | None:
        return {"/sys/fs/cgroup/memory.max": 100 * 2**20, "/sys/fs/cgroup/memory.current": 10 * 2**20}.get(path)

    monkeypatch.setattr(arena, "_read_int", fake)
    limit, where = arena.host_memory_limit()
    assert limit == 90 * 2**20 and "memory.max" in where


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1GiB") == 2**30
    assert parse_size(4096) == 4096


@pytest.mark.parametrize("name", ["demo.yaml", "multi_gpu.yaml", "npy_files.yaml", "cluster.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name, check_host=False)
    assert cfg.stages


def stage(**kw: object) -> StageConfig:
    return StageConfig.model_validate({"name": "s", "fn": "workers.stages:identity", **kw})


@pytest.mark.parametrize("kw, count, expected", [
    ({"device": "cpu", "replicas": 3}, 4, ["cpu"] * 3),
    ({"device": "auto"}, 0, ["cpu"]),
    ({"device": "auto", "devices": "all", "replicas_per_device": 2}, 3,
     ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:2", "cuda:2"]),
    ({"device": "cuda", "devices": [0, 2], "replicas": 3}, 4, ["cuda:0", "cuda:2", "cuda:0"]),
    ({"device": "cuda", "replicas": 4}, 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    ({"device": "cuda:1", "replicas": 2}, 2, ["cuda:1", "cuda:1"]),
    ({"device": "cuda", "replicas_per_device": 2}, 0, ["cpu", "cpu"]),
])
def test_device_plan_with_faked_gpu_counts(kw: dict, count: int, expected: list[str]) -> None:
    assert plan_devices(stage(**kw), count) == expected


@pytest.mark.parametrize("kw, count, message", [
    ({"device": "cuda:3"}, 2, "cuda:3 does not exist; this host has 2 CUDA device"),
    ({"device": "cuda", "devices": [0, 5]}, 4, "[5] do not exist"),
    ({"device": "cuda"}, 0, "cuda would run on the CPU: this host has no CUDA device"),
    ({"device": "auto"}, 0, "auto would run on the CPU: this host has no CUDA device"),
])
def test_impossible_devices_are_errors(kw: dict, count: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        plan_devices(stage(**kw), count, require_gpu=True)
    assert message in str(err.value)


def test_cpu_fallback_warns_once_per_stage() -> None:
    seen: list[str] = []
    assert plan_devices(stage(device="cuda", replicas=3), 0, warn=seen.append) == ["cpu"] * 3
    assert len(seen) == 1 and "running it on the CPU" in seen[0]
    seen.clear()
    plan_devices(stage(device="auto", replicas=3), 0, warn=seen.append)
    assert seen == []  # auto means "CPU if no GPU": nothing to warn about
