"""`shmbroker doctor`: each misconfiguration is found and comes with its fix."""

from __future__ import annotations

import resource
import socket
from pathlib import Path

import pytest

from broker.errors import BrokerError
from shmbroker import doctor
from shmbroker.cli import main, preflight
from shmbroker.config import load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_demo_passes_on_this_host() -> None:
    checks = doctor.run_checks(load_config(DEMO))
    assert all(c.status != "fail" for c in checks), checks


def test_capacity_above_the_limit_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "host_memory_limit", lambda: (64 * 2**20, "the container's memory limit"))
    cfg = load_config(DEMO, check_host=False)  # the demo asks for 128 MiB
    mem = by_name(doctor.run_checks(cfg))["memory"]
    assert mem.status == "fail"
    assert "128.0 MiB > 64.0 MiB" in mem.detail and "broker.capacity" in mem.fix
    with pytest.raises(BrokerError, match="preflight failed"):
        preflight(cfg, False)


def test_low_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    real = resource.getrlimit
    monkeypatch.setattr(doctor.resource, "getrlimit",
                        lambda r: (32, 4096) if r == resource.RLIMIT_NOFILE else real(r))
    c = by_name(doctor.run_checks(load_config(DEMO)))["open files"]
    assert c.status == "fail" and c.fix.startswith("ulimit -n ")


def test_busy_tcp_endpoint(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = load_config(DEMO, [f"broker.endpoint=tcp://127.0.0.1:{port}"])
        c = by_name(doctor.run_checks(cfg))["endpoint"]
    assert c.status == "fail" and "cannot be bound" in c.detail


def test_impossible_gpu_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shmbroker.plan.cuda_count", lambda: 2)
    cfg = load_config(DEMO, ["stages.infer.device=cuda:5"])
    c = by_name(doctor.run_checks(cfg))["devices of infer"]
    assert c.status == "fail" and "cuda:5 does not exist" in c.detail


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(DEMO)]) == 0
    assert main(["doctor", str(DEMO), "--set", "broker.capacity=100TiB"]) == 1
    assert "fail" in capsys.readouterr().out


def test_worker_on_a_missing_gpu_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    multi = DEMO.parent / "multi_gpu.yaml"
    monkeypatch.setattr("shmbroker.plan.cuda_count", lambda: 0)
    assert main(["worker", "--config", str(multi), "--stage", "infer", "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--device cuda:1: this host has no CUDA device" in err and "--device cpu" in err
    monkeypatch.setattr("shmbroker.plan.cuda_count", lambda: 1)
    assert main(["worker", "--config", str(multi), "--stage", "infer", "--device", "cuda:1"]) == 2
    assert "--device cuda:1 does not exist; this host has 1 CUDA device(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["worker", "--config", str(multi), "--stage", "infer", "--device", "gpu1"])
    assert "expected cpu, cuda or cuda:N, not 'gpu1'" in capsys.readouterr().err


def test_require_gpu_fails_for_auto_stages_too(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("shmbroker.plan.cuda_count", lambda: 0)
    cfg = load_config(DEMO)  # infer: device auto
    c = by_name(doctor.run_checks(cfg, require_gpu=True))["devices of infer"]
    assert c.status == "fail" and "auto would run on the CPU" in c.detail and "--require-gpu" in c.detail
    assert by_name(doctor.run_checks(cfg))["devices of infer"].status == "ok"  # without: auto means CPU
    assert main(["doctor", str(DEMO), "--require-gpu"]) == 1
    out = capsys.readouterr().out
    assert "devices of infer" in out and "stages[infer].device" in out  # not eaten as rich markup
    with pytest.raises(BrokerError, match="preflight failed"):
        preflight(cfg, True)


@pytest.mark.parametrize("setting, status", [
    ("always within_size advise [never] deny force", "warn"),
    ("always within_size [advise] never deny force", "warn"),
    ("always [within_size] advise never deny force", "ok"),
    ("[always] within_size advise never deny force", "ok"),
])
def test_arena_pages_say_whether_the_host_gives_huge_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           setting: str, status: str) -> None:
    path = tmp_path / "shmem_enabled"
    path.write_text(setting + "\n")
    monkeypatch.setattr(doctor, "SHMEM_THP", str(path))
    check = by_name(doctor.run_checks(load_config(DEMO)))["arena pages"]
    assert check.status == status
    assert ("within_size" in check.fix) == (status == "warn")
    monkeypatch.setattr(doctor, "SHMEM_THP", str(tmp_path / "absent"))
    assert by_name(doctor.run_checks(load_config(DEMO)))["arena pages"].status == "ok"
