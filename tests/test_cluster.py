"""A pipeline on a Ray cluster: real nodes started on this machine by ``ray.cluster_utils.Cluster``.

Every node (separate raylet and object store) is started on 127.0.0.1 and
the driver connects the same way (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
makes Ray take the loopback address), so no traffic leaves the machine. Each
test starts its own cluster and shuts it down (the leak check then finds no
process or runtime directory left). Tests marked ``cluster`` take 20-40 s
each and run with ``pytest -m cluster``; the first one runs in every suite.
The planning tests need no cluster (``shmbroker/cluster/plan.py`` is pure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's nodes and this driver take 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray sends nothing anywhere

from broker.errors import ConfigError  # noqa: E402
from shmbroker.cluster.plan import NodeInfo, plan_cluster, stage_modules  # noqa: E402
from shmbroker.config import PipelineConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STORE = 100 * 2**20  # each node's object store


def _ray() -> Any:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'shmbroker[ray]')")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before this module
    return ray


@pytest.fixture
def cluster(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A head node and the nodes ``request.param`` lists (``add_node`` keyword arguments);
    shut down at the end of the test, whatever happened."""
    ray = _ray()
    from ray.cluster_utils import Cluster

    extra = getattr(request, "param", [{"num_cpus": 2}])
    # Ray's sessions (logs, sockets, the address file) go to a directory of the test's own, removed
    # afterwards; a short path, since Ray's Unix sockets live under it
    temp = tempfile.mkdtemp(prefix="shmbroker-ray-")
    monkeypatch.setenv("RAY_TMPDIR", temp)
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={  # with 3 nodes, the head takes no work
            "num_cpus": 2 if len(extra) < 2 else 0, "node_ip_address": "127.0.0.1",
            "object_store_memory": STORE, "include_dashboard": False})
        c.extra = [c.add_node(node_ip_address="127.0.0.1", object_store_memory=STORE, **kw) for kw in extra]
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if c is not None:
            c.shutdown()
        else:  # the head failed half-way: end what it started, found by the directory only it uses
            for pid in _pids_mentioning(temp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def write_config(tmp_path: Path, stages: list[dict[str, Any]], count: int = 40, **extra: Any) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "cl", "broker": {"capacity": "32MiB", "max_inflight": 8},
        "source": {"type": "synthetic", "count": count, "shape": [8], "dtype": "float32", "seed": 3},
        "stages": stages, "cluster": {"engine": "ray"}, **extra}))
    return cfg


def node_ids(ray: Any) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def tag(row: np.ndarray) -> str:
    return bytes(row).decode()


# -- on a cluster -----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_two_nodes_give_the_in_process_results_and_both_do_work(cluster: Any, tmp_path: Path) -> None:
    """A CPU stage on both nodes: results exactly equal to calling the stage in this process, items
    processed on both nodes (SHMBROKER_NODE_ID), the caller's ray.init used and left connected."""
    import stage_helpers
    import torch

    from shmbroker.driver import Pipeline

    ray = _ray()
    ray.init(address=cluster.address)
    cfg = write_config(tmp_path, [{"name": "tag", "fn": "stage_helpers:on_node", "replicas": 1}])
    arrays = [np.random.default_rng(i).standard_normal(8).astype(np.float32) for i in range(40)]
    with Pipeline.from_yaml(cfg) as p:
        out = list(p.map(arrays))
        summary = p.last_summary
        again = list(p.map(arrays[:8]))  # a second run of the same pipeline
    assert all(np.array_equal(a["y"], o["y"]) for a, o in zip(again, out[:8], strict=True))
    reference = [stage_helpers.on_node(torch.from_numpy(a))["y"].numpy() for a in arrays]
    assert len(out) == 40 and all(np.array_equal(o["y"], r) for o, r in zip(out, reference, strict=True))
    assert {tag(o["node"]) for o in out} == node_ids(ray)
    assert summary.items == 40 and summary.duplicates == 0 and len(summary.nodes) == 2
    assert summary.moved["items"] == 0  # every stage runs on both nodes: nothing crosses
    assert ray.is_initialized()  # the caller's connection stays the caller's


@pytest.mark.cluster
@pytest.mark.timeout(240)
@pytest.mark.parametrize("cluster", [[{"num_cpus": 3, "num_gpus": 2}]], indirect=True)
def test_cli_run_places_a_gpu_stage_on_gpu_nodes_and_moves_items_there(cluster: Any, tmp_path: Path) -> None:
    """`shmbroker run --set cluster.address=...` with a GPU stage on the node advertising 2 (fake)
    GPUs: one worker per GPU there (replicas_per_device), none on the head, the CPU fallback said
    once; items fed to the head cross to it (bytes counted); the npy sink's files equal the
    reference; `status` shows both nodes while it runs; `doctor` checks the nodes."""
    gpu_node = cluster.extra[0].node_id
    cfg = write_config(tmp_path, [
        {"name": "tag", "fn": "stage_helpers:on_node", "replicas": 1},
        {"name": "gpu", "fn": "stage_helpers:node_of", "args": {"seconds": 0.2}, "device": "cuda",
         "replicas_per_device": 1, "batch": 4}], count=60, sink={"type": "npy", "path": str(tmp_path / "out")})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
           "SHMBROKER_RUNTIME_DIR": str(tmp_path / "rundir")}
    cli = [sys.executable, "-m", "shmbroker"]
    where = f"cluster.address={cluster.address}"
    doctor = subprocess.run([*cli, "doctor", str(cfg), "--set", where], env=env, capture_output=True,
                            text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert doctor.stdout.count("memory") >= 2 and "placement" in doctor.stdout
    run = subprocess.Popen([*cli, "run", str(cfg), "--set", where, "--json", "--no-progress"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        status = None
        deadline = time.monotonic() + 120
        while status is None and run.poll() is None and time.monotonic() < deadline:
            if list((tmp_path / "rundir").glob("cluster.*.json")):
                status = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True,
                                        timeout=60)
            time.sleep(0.2)
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err[-3000:]
    assert status is not None and status.returncode == 0, status and status.stderr
    both = {cluster.head_node.node_id, gpu_node}
    assert {n["node"] for n in json.loads(status.stdout)["nodes"]} == both, status.stdout[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert {n["node"] for n in summary["nodes"]} == both
    gpu_workers = [(n["node"], w["device"], w["num_gpus"]) for n in summary["nodes"] for w in n["workers"]
                   if w["stage"] == "gpu"]
    assert gpu_workers == [(gpu_node, "cpu", 1.0)] * 2  # one per (fake) GPU, run on the CPU fallback
    assert err.count("running it on the CPU there") == 1
    assert summary["moved"]["items"] > 0 and summary["moved"]["bytes"] == summary["moved"]["items"] * 128
    assert not list((tmp_path / "rundir").glob("cluster.*"))  # the run file goes with the run
    rng = np.random.default_rng(3)
    for i in range(60):
        item = rng.standard_normal([8]).astype(np.float32)
        with np.load(tmp_path / "out" / f"{i:06d}.npz") as f:
            assert np.array_equal(f["y"], item * 2 + 1)
            assert tag(f["second"]) == gpu_node
    assert json.loads((tmp_path / "out" / "shmbroker-run.json").read_text())["complete"] is True


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_node_removed_mid_run_still_delivers_every_item_once(cluster: Any, tmp_path: Path) -> None:
    """The second node is removed (its raylet killed) while items are in flight on it: they are
    sent again to the head, every result is delivered exactly once and equals the reference."""
    from shmbroker.driver import Pipeline

    ray = _ray()
    ray.init(address=cluster.address)
    cfg = write_config(tmp_path, [
        {"name": "tag", "fn": "stage_helpers:on_node", "replicas": 1},
        {"name": "slow", "fn": "stage_helpers:node_of", "args": {"seconds": 0.03}, "replicas": 1}], count=120)
    arrays = [np.full(8, i, np.float32) for i in range(120)]
    out = []
    gone = cluster.extra[0].node_id
    with Pipeline.from_yaml(cfg) as p:
        for k, o in enumerate(p.map(arrays)):
            out.append(o)
            if k == 15:
                cluster.remove_node(cluster.extra[0], allow_graceful=False)
        summary = p.last_summary
        assert any(gone[:8] in w and "is gone" in w for w in p.warnings)
    assert len(out) == 120 and all(np.array_equal(o["y"], a * 2 + 1) for o, a in zip(out, arrays, strict=True))
    assert summary.items == 120 and summary.moved["lost_nodes"] == [gone]
    assert any(tag(o["second"]) == gone for o in out[:16])  # the removed node did work before


@pytest.mark.cluster
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cluster", [[{"num_cpus": 2}, {"num_cpus": 2, "num_gpus": 1}]], indirect=True)
def test_a_node_lost_while_it_hands_items_on_loses_none(cluster: Any, tmp_path: Path) -> None:
    """Node A runs only the CPU stage and hands every item to node B (the GPU stage's); A is removed
    mid-run, with items in its arena and hand-offs in the air: every item still arrives once, all
    of the GPU stage on B."""
    from shmbroker.driver import Pipeline

    ray = _ray()
    ray.init(address=cluster.address)
    a, b = cluster.extra[0], cluster.extra[1]
    cfg = write_config(tmp_path, [
        {"name": "tag", "fn": "stage_helpers:on_node", "replicas": 1},
        {"name": "gpu", "fn": "stage_helpers:node_of", "args": {"seconds": 0.02}, "device": "cuda"}], count=150)
    arrays = [np.full(8, i, np.float32) for i in range(150)]
    out = []
    with Pipeline.from_yaml(cfg) as p:
        assert {n.node.node_id for n in p.plans.values()} == {a.node_id, b.node_id}
        for k, o in enumerate(p.map(arrays)):
            out.append(o)
            if k == 15:
                cluster.remove_node(a, allow_graceful=False)
        summary = p.last_summary
    assert len(out) == 150 and all(np.array_equal(o["y"], x * 2 + 1) for o, x in zip(out, arrays, strict=True))
    assert {tag(o["second"]) for o in out} == {b.node_id}
    assert any(tag(o["first"]) == a.node_id for o in out[:16])  # A did its part before it went
    assert summary.moved["lost_nodes"] == [a.node_id]


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_killed_worker_actor_is_restarted_and_loses_nothing(cluster: Any, tmp_path: Path) -> None:
    """kill -9 of a worker actor mid-run: its node's broker re-queues its task, its agent starts
    a new one; every item is delivered once and the summary counts the restart."""
    from shmbroker.driver import Pipeline

    ray = _ray()
    ray.init(address=cluster.address)
    cfg = write_config(tmp_path, [{"name": "slow", "fn": "stage_helpers:slow", "args": {"seconds": 0.05},
                                   "replicas": 1}], count=80)
    arrays = [np.full(8, i, np.float32) for i in range(80)]
    out = []
    with Pipeline.from_yaml(cfg) as p:
        victim = p.node_stats()[0]["workers"][0]["pid"]
        for k, o in enumerate(p.map(arrays)):
            out.append(o)
            if k == 10:
                os.kill(victim, signal.SIGKILL)
        summary = p.last_summary
    assert len(out) == 80 and all(np.array_equal(o, a + 1) for o, a in zip(out, arrays, strict=True))
    assert summary.restarts == {"slow": 1}


# -- without a cluster ------------------------------------------------------------------------------
def _program(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_without_ray_a_cluster_config_says_how_to_install_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [{"name": "tag", "fn": "stage_helpers:on_node"}])
    done = _program(tmp_path, "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
                              f"from shmbroker.cli import main; sys.exit(main(['run', {str(cfg)!r}]))")
    assert done.returncode == 2, done.stderr
    assert "needs Ray, which is not installed" in done.stderr and "pip install 'shmbroker[ray]'" in done.stderr


def test_a_single_host_run_never_imports_ray(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"type": "synthetic", "count": 8, "shape": [4]},
                                   "stages": [{"name": "s", "fn": "stage_helpers:ray_loaded"}]}))
    done = _program(tmp_path, "import sys\nfrom broker import Pipeline\n"
                              f"with Pipeline.from_yaml({str(cfg)!r}) as p:\n"
                              "    out = list(p.map([[0.0] * 4] * 8))\n"
                              "print(sorted({float(o[0]) for o in out}), 'ray' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0.0]", "False"]  # neither the workers nor the driver loaded Ray


def test_status_finds_a_live_cluster_run_and_cleanup_removes_a_dead_ones_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shmbroker.cli import main
    from shmbroker.cluster.status import live_run, remove_run_file, write_run_file

    monkeypatch.setenv("SHMBROKER_RUNTIME_DIR", str(tmp_path))
    mine = write_run_file("127.0.0.1:6379", ["shmbroker-agent:x:aaaa"], ["a" * 56])
    dead = tmp_path / "cluster.999999999.json"  # a driver killed with kill -9 left this behind
    dead.write_text(json.dumps({"pid": 999999999, "address": "x", "agents": [], "nodes": []}))
    run = live_run()
    assert run is not None and run["pid"] == os.getpid() and run["agents"] == ["shmbroker-agent:x:aaaa"]
    assert main(["cleanup"]) == 0
    assert not dead.exists() and mine.exists()
    remove_run_file(mine)
    assert live_run() is None and not list(tmp_path.iterdir())


# -- planning (no Ray needed) -----------------------------------------------------------------------
def _cfg(stages: list[dict[str, Any]], **cluster: Any) -> PipelineConfig:
    return PipelineConfig.model_validate({"source": {"type": "synthetic", "count": 1, "shape": [1]},
                                          "stages": stages, "cluster": {"engine": "ray", **cluster}})


HEAD = NodeInfo("a" * 56, "10.0.0.1", 4, 0, 8 << 30, head=True)
GPU2 = NodeInfo("b" * 56, "10.0.0.2", 8, 2, 8 << 30)


def test_plan_puts_gpu_workers_per_device_on_gpu_nodes_and_cpu_stages_everywhere() -> None:
    cfg = _cfg([{"name": "pre", "fn": "m:f", "replicas": 2},
                {"name": "infer", "fn": "m:g", "device": "cuda", "devices": [1], "replicas_per_device": 2},
                {"name": "post", "fn": "m:h"}])
    plans = {p.node.node_id: p for p in plan_cluster(cfg, [HEAD, GPU2])}
    head, gpu = plans[HEAD.node_id], plans[GPU2.node_id]
    assert head.stages == [0, 2] and gpu.stages == [0, 1, 2]
    assert [(w.stage, w.device, w.num_gpus) for w in gpu.workers if w.stage == 1] == [(1, "cuda:1", 0.5)] * 2
    assert [w.stage for w in head.workers] == [0, 0, 2]
    # on the head, `pre` writes into the node's sink (its next stage runs elsewhere); `post` too
    assert head.spec(cfg, 0).index == 1 and head.spec(cfg, 0).next_name == "" and head.next_missing(0) == 1
    assert gpu.spec(cfg, 0).index == 0 and gpu.spec(cfg, 0).next_name == "infer" and gpu.next_missing(0) == 3
    assert head.spec(cfg, 0).search_path == ()  # stage code comes through Ray's runtime_env


def test_plan_without_gpus_falls_back_to_the_cpu_once_or_refuses_with_require_gpu() -> None:
    cfg = _cfg([{"name": "infer", "fn": "m:g", "device": "cuda", "replicas": 1}])
    said: list[str] = []
    plans = plan_cluster(cfg, [HEAD, NodeInfo("c" * 56, "10.0.0.3", 2, 0, 8 << 30)], warn=said.append)
    assert [w.device for p in plans for w in p.workers] == ["cpu", "cpu"] and len(said) == 1
    with pytest.raises(ConfigError, match="no node of the cluster advertises a GPU"):
        plan_cluster(cfg, [HEAD], require_gpu=True)


def test_plan_refuses_a_node_that_cannot_hold_its_workers_or_the_arena() -> None:
    cfg = _cfg([{"name": "pre", "fn": "m:f", "replicas": 3}])
    small = NodeInfo("d" * 56, "10.0.0.4", 2, 0, 8 << 30)
    with pytest.raises(ConfigError, match=r"has 2 Ray CPUs.*3 workers.*worker_cpus to at most 0.67"):
        plan_cluster(cfg, [small])
    assert plan_cluster(_cfg([{"name": "pre", "fn": "m:f", "replicas": 3}], worker_cpus=0.5), [small])
    tiny = NodeInfo("e" * 56, "10.0.0.5", 2, 0, 16 << 20)
    with pytest.raises(ConfigError, match="more than node eeeeeeee"):
        plan_cluster(_cfg([{"name": "pre", "fn": "m:f"}]), [tiny])


def test_stage_code_next_to_the_config_travels_but_installed_packages_do_not(tmp_path: Path) -> None:
    (tmp_path / "mystage.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    cfg = _cfg([{"name": "a", "fn": "mystage:f"}, {"name": "b", "fn": "mypkg.sub:f"},
                {"name": "c", "fn": "torch.nn.functional:relu"}, {"name": "d", "fn": "workers.stages:normalize"}])
    assert stage_modules(cfg, (str(tmp_path),)) == [str(tmp_path / "mystage.py"), str(tmp_path / "mypkg")]


def test_cluster_block_is_absent_by_default_and_set_adds_it(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"type": "synthetic", "count": 1, "shape": [1]},
                                   "stages": [{"name": "s", "fn": "m:f"}]}))
    assert load_config(cfg).cluster is None
    c = load_config(cfg, ["cluster.address=ray://head:10001"]).cluster
    assert c is not None and c.engine == "ray" and c.address == "ray://head:10001"
    with pytest.raises(ConfigError, match="--set cluster.engine=dask: cluster.engine"):
        load_config(cfg, ["cluster.engine=dask"])
