#!/usr/bin/env python
"""Broker rate: small-handle operations per second, with 1 and 2 client processes.

Issue 13's "small operations" goal: >= 200,000 put+get+release per second with
one client (scenario a1), printed as met/MISSED.

One command::

    .venv/bin/python benchmarks/rate.py [--quick] [--reps N] [--seconds S] [--profile]
                                        [--out benchmarks/results/rate.json]

Scenarios (every client is its own ``spawn`` process; the broker is the
``Broker()`` process; each scenario runs for ``--seconds`` per repetition,
repetitions are interleaved round-robin across scenarios after one warm-up
round, and the table shows the median and min-max of the repetitions):

a1  put+get+release, 1 client: ``h = c.put(a4k); c.get(h); c.release(h)``.
    One op = that triple, with a default ``Client`` (pool and holds): the
    4 KiB block comes from the client's pool (no message; the pool is refilled
    with ``alloc_many``, one round trip per 64 blocks, only until released
    blocks come back), ``get`` is local (the client's own block), ``release``
    retires the block into the pool (no message; once the pool runs dry a
    batch of retired blocks is checked against every hold table and reused:
    one scan and one ``membarrier`` per batch). So no broker message per op.
a1-unix  the same with ``Client(pool=False)``: one ``alloc`` round trip per put,
    a ``drop`` message (not waited for) per release.
a1-zmq   the same with ``Client(transport="zmq", pool=False)``: requests over
    ZeroMQ, as every client did before the Unix transport.
a2  the a1 loop in 2 client processes at once; ops/s is the sum of both
    (total ops / (last end - first start)).
b   cross-client: client A ``put``s 4 KiB arrays (pooled) in batches of 64 and
    sends the Handles (pickled) over a ``multiprocessing.Pipe`` to client B,
    which does ``get`` (a hold in B's table in shared memory: no message) +
    ``release`` (clears the hold: no message) per handle and acks the batch;
    A then releases the batch (back to its pool: no message). Up to 4 batches
    in flight. Two numbers: pairs/s = handles consumed by B / A's wall time
    (end to end, both processes concurrently), and B-only ops/s = handles /
    time B spent inside get+release.
b-many  the same, but B takes each batch with one ``get_many`` (64 holds) and
    drops it with one ``release``.
b-lease the same as b with B's client made with ``holds=False``: the old
    path, kept measured: ``get`` takes a lease from the broker (an ``acquire``
    round trip), ``release`` drops it (a message not waited for).
c   ``Pipeline.map`` over tiny float32 arrays (64 B and 4 KiB) through one
    identity stage with 1 worker (threads 1, credits 2): items/s = results /
    wall time of the map. Per item at most: driver reserve (a round trip) +
    commit, worker reserve (a round trip) + done, driver done (messages not
    answered) and 2 task messages; the driver reserves up to 16 items per
    request.

References (same machine, same loop shape, 1 client):
ping       ``Client.ping()``: one broker round trip, no work (Unix transport).
ping-zmq   the same over ZeroMQ (``transport="zmq"``).
zmq-echo   a Python ROUTER process echoing a ~100 B msgpack map to a DEALER
           (the broker's transport without the broker's logic).
unix-echo  the same echo over an AF_UNIX SOCK_SEQPACKET socket (no ZeroMQ I/O threads).

CPU columns: process CPU time (utime+stime, all threads incl. ZeroMQ's I/O
thread) of the client(s) and of the broker during the repetition, per op
(for the echo references the "broker" column is the echo server; for c the
client is the driver, and the worker's CPU is in the notes). "wall us/op" is
1e6 / (median ops/s). "others' cores": median over reps of the CPU used meanwhile by
processes outside this benchmark (plus hypervisor steal), from /proc/stat.

``--ray``: afterwards (Ray's own processes would disturb the rounds above if
they ran alongside), the same loops against Ray's object store in a fresh
process: ``r = ray.put(a4k); ray.get(r); del r`` (ray a1) and ``ray.get(r)``
of one existing ref (the op behind Ray's published gets/s), 5 reps x
``--seconds``, if ``ray`` is importable (``pip install ray``).

``--profile``: afterwards, runs a1 once more for ``--profile-seconds`` while
py-spy samples the broker and the client (``record --gil``: only time spent
holding the GIL, i.e. running Python) and writes the top functions into the
JSON and the raw stacks into benchmarks/results/rate_profile_*.txt.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bench_util import (
    RESULTS,
    Foreign,
    cpu_seconds,
    diff,
    fmt_rate,
    machine_info,
    maybe_plot,
    summarize,  # noqa: E402
    table,
    thread_cpu,
    write_json,
)

TARGET = 200_000  # issue 13: put+get+release per second with one client (was 20,000)
RAY_GETS = 10_600
ITEM_BYTES = 4096


# -- client processes -----------------------------------------------------------------
def _wait_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.005))


def _loop_pgr(c: Any, a: np.ndarray, dur: float) -> int:
    n = 0
    end = time.monotonic() + dur
    while time.monotonic() < end:
        h = c.put(a)
        c.get(h)
        c.release(h)
        n += 1
    return n


def _loop_ping(c: Any, dur: float) -> int:
    n = 0
    end = time.monotonic() + dur
    while time.monotonic() < end:
        c.ping()
        n += 1
    return n


_ECHO: dict[str, Any] = {}  # one connection per echo server, kept for the process's life


def _loop_zmq_echo(endpoint: str, dur: float) -> int:
    import msgpack
    import zmq

    s = _ECHO.get(endpoint)
    payload = {"v": 1, "op": "acquire", "rid": 0, "oid": 123456, "gen": 7}
    if s is None:
        ctx = zmq.Context()
        s = _ECHO[endpoint] = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        for _ in range(100):  # warm the connection
            s.send(msgpack.packb(payload))
            msgpack.unpackb(s.recv())
    n = 0
    end = time.monotonic() + dur
    while time.monotonic() < end:
        payload["rid"] = n
        s.send(msgpack.packb(payload))
        msgpack.unpackb(s.recv())
        n += 1
    return n


def _loop_unix_echo(path: str, dur: float) -> int:
    import msgpack

    s = _ECHO.get(path)
    if s is None:
        s = _ECHO[path] = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
    payload = {"v": 1, "op": "acquire", "rid": 0, "oid": 123456, "gen": 7}
    n = 0
    end = time.monotonic() + dur
    while time.monotonic() < end:
        payload["rid"] = n
        s.send(msgpack.packb(payload))
        msgpack.unpackb(s.recv(4096))
        n += 1
    return n


def _produce(c: Any, peer: Any, a: np.ndarray, dur: float, batch: int = 64, depth: int = 4) -> int:
    pending: collections.deque[list[Any]] = collections.deque()
    acked = 0
    end = time.monotonic() + dur
    while time.monotonic() < end:
        hs = [c.put(a) for _ in range(batch)]
        peer.send(hs)
        pending.append(hs)
        while len(pending) >= depth or (pending and peer.poll(0)):
            peer.recv()
            c.release(pending.popleft())
            acked += batch
    peer.send(None)
    while pending:
        peer.recv()
        c.release(pending.popleft())
        acked += batch
    return acked


def _consume(c: Any, peer: Any, many: bool) -> tuple[int, float]:
    n, busy = 0, 0.0
    while True:
        hs = peer.recv()
        if hs is None:
            return n, busy
        t = time.perf_counter()
        if many:
            c.get_many(hs)
            c.release(hs)
        for h in hs if not many else ():
            c.get(h)
            c.release(h)
        busy += time.perf_counter() - t
        n += len(hs)
        peer.send(1)


def client_proc(endpoint: str, cmd: Any, peer: Any, idx: int) -> None:
    from broker import Client

    clients = {"fast": Client(endpoint, name=f"rate-client-{idx}"),
               "unix": Client(endpoint, name=f"rate-client-{idx}-nopool", pool=False),
               "zmq": Client(endpoint, name=f"rate-client-{idx}-zmq", transport="zmq", pool=False),
               "lease": Client(endpoint, name=f"rate-client-{idx}-noholds", holds=False)}
    c = clients["fast"]
    a = np.ones(ITEM_BYTES // 4, np.float32)
    for each in clients.values():
        _loop_pgr(each, a, 0.2)  # first-touch of the blocks the loop reuses
    cmd.send(("ready", os.getpid()))
    while True:
        msg = cmd.recv()
        op = msg[0]
        if op == "quit":
            break
        start_at = msg[-1]
        _wait_until(start_at)
        th0 = thread_cpu(os.getpid())
        cpu0, t0 = time.process_time(), time.monotonic()
        extra: Any = None
        if op == "pgr":
            n = _loop_pgr(clients[msg[2]], a, msg[1])
        elif op == "ping":
            n = _loop_ping(clients[msg[2]], msg[1])
        elif op == "zmq_echo":
            n = _loop_zmq_echo(msg[2], msg[1])
        elif op == "unix_echo":
            n = _loop_unix_echo(msg[2], msg[1])
        elif op == "produce":
            n = _produce(c, peer, a, msg[1])
        elif op == "consume":
            n, extra = _consume(clients[msg[2]], peer, msg[1])
        else:
            raise ValueError(op)
        t1 = time.monotonic()
        cpu = time.process_time() - cpu0
        cmd.send((n, t0, t1, cpu, extra, diff(thread_cpu(os.getpid()), th0)))
    for each in clients.values():
        each.close()


def zmq_echo_server(endpoint: str, ready: Any) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    ready.send(os.getpid())
    while True:
        poller.poll(500)  # the broker's loop shape: poll, then drain
        while True:
            try:
                ident, payload = s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = msgpack.unpackb(payload)
            s.send_multipart([ident, msgpack.packb({"v": 1, "op": "ok", "rid": msg["rid"]})],
                             zmq.NOBLOCK)


def unix_echo_server(path: str, ready: Any) -> None:
    import msgpack

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(8)
    ready.send(os.getpid())
    while True:
        conn, _ = srv.accept()
        while True:
            data = conn.recv(4096)
            if not data:
                conn.close()
                break
            msg = msgpack.unpackb(data)
            conn.send(msgpack.packb({"v": 1, "op": "ok", "rid": msg["rid"]}))


# -- pipeline scenario ----------------------------------------------------------------
IDENTITY_YAML = """\
name: rate-identity
broker:
  capacity: 64MiB
source: {type: synthetic, count: 1, shape: [16]}
stages:
  - name: ident
    fn: workers.stages:identity
    replicas: 1
    threads: 1
sink: {type: "null"}
"""


def map_run(p: Any, nbytes: int, dur: float) -> tuple[int, float]:
    a = np.arange(nbytes // 4, dtype=np.float32)
    end = [0.0]

    def items() -> Any:
        while time.monotonic() < end[0]:
            yield a

    t0 = time.monotonic()
    end[0] = t0 + dur
    n = 0
    for _out in p.map(items()):
        n += 1
    return n, time.monotonic() - t0


# -- orchestration --------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = mp.get_context("spawn")
        self.tmp = tempfile.mkdtemp(prefix="shmb-rate-")
        self.procs: list[Any] = []

    def start(self) -> None:
        from broker import Broker, Pipeline

        self.broker = Broker(capacity=64 * 2**20)
        self.cmd = []
        self.client_pids = []
        a_peer, b_peer = self.ctx.Pipe()
        for i, peer in enumerate((a_peer, b_peer)):
            mine, theirs = self.ctx.Pipe()
            p = self.ctx.Process(target=client_proc, args=(self.broker.endpoint, theirs, peer, i), daemon=True)
            p.start()
            self.procs.append(p)
            self.cmd.append(mine)
        for c in self.cmd:
            tag, pid = c.recv()
            self.client_pids.append(pid)
        self.zmq_ep = f"ipc://{self.tmp}/echo.sock"
        self.unix_path = f"{self.tmp}/echo.seq"
        self.server_pid = {}
        for name, target, where in (("zmq-echo", zmq_echo_server, self.zmq_ep),
                                    ("unix-echo", unix_echo_server, self.unix_path)):
            r, w = self.ctx.Pipe()
            p = self.ctx.Process(target=target, args=(where, w), daemon=True)
            p.start()
            self.procs.append(p)
            self.server_pid[name] = r.recv()
        yaml_path = Path(self.tmp) / "identity.yaml"
        yaml_path.write_text(IDENTITY_YAML)
        self.pipeline = Pipeline.from_yaml(yaml_path).__enter__()
        map_run(self.pipeline, 64, 0.5)  # waits for the worker to start and register

    def close(self) -> None:
        for c in self.cmd:
            try:
                c.send(("quit",))
            except OSError:
                pass
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close()
        for p in self.procs:
            p.join(2)
            if p.exitcode is None:
                p.terminate()
                p.join(2)
        self.broker.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # one repetition of one scenario -> {"ops_s", "client_cpu_us", "broker_cpu_us", ...}
    def run(self, name: str, dur: float) -> dict[str, Any]:
        bpid = self.server_pid.get(name, self.broker.pid)  # the echo server stands in for the broker
        start_at = time.monotonic() + 0.05
        b0 = cpu_seconds(bpid)
        bt0 = thread_cpu(bpid)
        single = {"ping": ("ping", dur, "unix"), "ping-zmq": ("ping", dur, "zmq"),
                  "a1": ("pgr", dur, "fast"), "a1-unix": ("pgr", dur, "unix"), "a1-zmq": ("pgr", dur, "zmq"),
                  "zmq-echo": ("zmq_echo", dur, self.zmq_ep), "unix-echo": ("unix_echo", dur, self.unix_path)}
        if name in single:
            op = single[name]
            self.cmd[0].send((*op, start_at))
            n, t0, t1, cpu, _, th = self.cmd[0].recv()
            out = {"ops": n, "seconds": t1 - t0, "ops_s": n / (t1 - t0), "client_cpu_s": cpu,
                   "client_threads_s": th}
        elif name == "a2":
            for c in self.cmd:
                c.send(("pgr", dur, "fast", start_at))
            res = [c.recv() for c in self.cmd]
            n = sum(r[0] for r in res)
            span = max(r[2] for r in res) - min(r[1] for r in res)
            out = {"ops": n, "seconds": span, "ops_s": n / span, "client_cpu_s": sum(r[3] for r in res),
                   "per_client_ops_s": [r[0] / (r[2] - r[1]) for r in res],
                   "client_threads_s": {k: res[0][5][k] + res[1][5][k] for k in res[0][5]}}
        elif name in ("b", "b-many", "b-lease"):
            self.cmd[1].send(("consume", name == "b-many", "lease" if name == "b-lease" else "fast", start_at))
            self.cmd[0].send(("produce", dur, start_at))
            na, t0, t1, cpu_a, _, tha = self.cmd[0].recv()
            nb, _, _, cpu_b, busy, thb = self.cmd[1].recv()
            assert na == nb, (na, nb)
            out = {"ops": nb, "seconds": t1 - t0, "ops_s": nb / (t1 - t0), "b_only_ops_s": nb / busy,
                   "b_busy_s": busy, "client_cpu_s": cpu_a + cpu_b, "a_cpu_s": cpu_a, "b_cpu_s": cpu_b,
                   "client_threads_s": {k: tha[k] + thb[k] for k in tha}}
        elif name.startswith("c"):
            nbytes = 64 if name == "c-64B" else ITEM_BYTES
            p = self.pipeline
            pb = p.broker.pid
            wpid = p.workers[0].proc.pid
            b0, w0, d0 = cpu_seconds(pb), cpu_seconds(wpid), time.process_time()
            bt0, dt0 = thread_cpu(pb), thread_cpu(os.getpid())
            n, secs = map_run(p, nbytes, dur)
            out = {"ops": n, "seconds": secs, "ops_s": n / secs,
                   "client_cpu_s": time.process_time() - d0,  # the driver (this process)
                   "worker_cpu_s": cpu_seconds(wpid) - w0,
                   "broker_cpu_s": cpu_seconds(pb) - b0,
                   "broker_threads_s": diff(thread_cpu(pb), bt0),
                   "client_threads_s": diff(thread_cpu(os.getpid()), dt0)}
            out["client_cpu_us"] = out["client_cpu_s"] / n * 1e6
            out["worker_cpu_us"] = out["worker_cpu_s"] / n * 1e6
            out["broker_cpu_us"] = out["broker_cpu_s"] / n * 1e6
            return out
        else:
            raise ValueError(name)
        out["broker_cpu_s"] = cpu_seconds(bpid) - b0
        out["broker_threads_s"] = diff(thread_cpu(bpid), bt0)
        n = max(1, out["ops"])
        out["client_cpu_us"] = out["client_cpu_s"] / n * 1e6
        out["broker_cpu_us"] = out["broker_cpu_s"] / n * 1e6
        return out


SCENARIOS = [
    # name, label, what one op is, broker round trips per op (analytic)
    ("a1", "a1 put+get+release, 1 client", "put+get+release 4 KiB", "0 (pool, holds)"),
    ("a1-unix", "a1 without the pool", "same, Client(pool=False)", "1 + 1 msg"),
    ("a1-zmq", "a1 over ZeroMQ, no pool", "same, transport=zmq", "1 + 1 msg"),
    ("a2", "a2 put+get+release, 2 clients", "same, summed over both", "0 (pool, holds)"),
    ("b", "b  A put -> B get+release (pairs/s)", "one handle A->B, end to end", "0 (pool, holds)"),
    ("b-many", "b  with get_many (pairs/s)", "one handle A->B, end to end", "0 (pool, holds)"),
    ("b-lease", "b  B without holds: leases (pairs/s)", "one handle A->B, end to end", "1 + 1 msg"),
    ("c-64B", "c  Pipeline.map identity, 64 B", "one item through 1 stage", "<= 2 + 3 msg + 2 tasks"),
    ("c-4KiB", "c  Pipeline.map identity, 4 KiB", "one item through 1 stage", "<= 2 + 3 msg + 2 tasks"),
    ("ping", "ref: broker ping", "one round trip", "1"),
    ("ping-zmq", "ref: broker ping over ZeroMQ", "one round trip", "1"),
    ("zmq-echo", "ref: pyzmq ROUTER echo (no broker)", "one round trip", "1"),
    ("unix-echo", "ref: AF_UNIX seqpacket echo", "one round trip", "1"),
]
REFS = ("ping", "ping-zmq", "zmq-echo", "unix-echo")


def _ray_loops(reps: int, dur: float, out: Any) -> None:
    """In a fresh process: Ray's put+get+del and get rates, medians of ``reps`` runs."""
    try:
        import ray
    except ImportError as e:
        out.send({"skipped": f"ray is not importable ({e})"})
        return
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        a = np.ones(ITEM_BYTES // 4, np.float32)
        ref = ray.put(a)
        res: dict[str, Any] = {"version": ray.__version__}
        for key in ("put_get", "get"):
            rates = []
            for _ in range(reps + 1):  # the first is a warm-up
                n, end = 0, time.monotonic() + dur
                t0 = time.monotonic()
                while time.monotonic() < end:
                    if key == "get":
                        ray.get(ref)
                    else:
                        r = ray.put(a)
                        ray.get(r)
                        del r
                    n += 1
                rates.append(n / (time.monotonic() - t0))
            res[key] = summarize(rates[1:])
        out.send(res)
    finally:
        ray.shutdown()


def measure_ray(reps: int, dur: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_ray_loops, args=(reps, dur, w))
    p.start()
    w.close()
    try:
        if r.poll(300):
            return dict(r.recv())
        return {"skipped": "no answer from the Ray process within 300 s"}
    except EOFError:
        return {"skipped": f"the Ray process exited with code {p.exitcode}"}
    finally:
        p.join(60)
        if p.exitcode is None:
            p.kill()


def profile_a1(bench: Bench, seconds: float) -> dict[str, Any]:
    """py-spy --gil on the broker and on client 0 while it runs a1."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"skipped": "py-spy not found (pip install py-spy)"}
    out: dict[str, Any] = {}
    files = {"broker": bench.broker.pid, "client": bench.client_pids[0]}
    procs = {}
    for who, pid in files.items():
        raw = RESULTS / f"rate_profile_{who}.txt"
        procs[who] = (raw, subprocess.Popen(
            [spy, "record", "--gil", "--nonblocking", "-r", "250", "-d", str(int(seconds)), "-f", "raw",
             "-o", str(raw), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    time.sleep(0.5)
    res = bench.run("a1", seconds - 1.0)
    out["a1_ops_s_while_profiled"] = res["ops_s"]
    out["ops"] = res["ops"]
    for who, (raw, proc) in procs.items():
        _, err = proc.communicate(timeout=seconds + 30)
        out[who] = summarize_stacks(raw, res["ops"], seconds - 1.0)
        out[who]["py_spy_stderr"] = err.decode()[-300:]
    return out


def summarize_stacks(path: Path, ops: int, seconds: float, top: int = 15) -> dict[str, Any]:
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        return {"error": str(e)}
    for line in lines:
        stack, _, n_txt = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_txt)
        total += n
        frames = stack.split(";")
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return {"samples_holding_gil": total, "rate_hz": 250,
            "gil_seconds_est": total / 250, "gil_us_per_op_est": total / 250 / max(1, ops) * 1e6,
            "top_self": [(f, round(100 * n / max(1, total), 1)) for f, n in self_c.most_common(top)],
            "top_inclusive": [(f, round(100 * n / max(1, total), 1)) for f, n in incl.most_common(top)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 reps of 0.5 s")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per scenario (default 5; quick 3)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per repetition (default 1.5)")
    ap.add_argument("--profile", action="store_true", help="py-spy the broker and a client during a1")
    ap.add_argument("--profile-seconds", type=float, default=8.0)
    ap.add_argument("--ray", action="store_true", help="also measure Ray's object store (if installed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "rate.json")
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    dur = args.seconds or (0.5 if args.quick else 1.5)
    reps = max(reps, 3)
    machine = machine_info(with_torch=True)
    t_start = time.monotonic()
    bench = Bench(args)
    raw: dict[str, list[dict[str, Any]]] = {s[0]: [] for s in SCENARIOS}
    profile: dict[str, Any] | None = None
    try:
        bench.start()
        print(f"warm-up round ({dur:.1f} s per scenario), then {reps} interleaved rounds", flush=True)
        for name, *_ in SCENARIOS:
            bench.run(name, min(dur, 0.5))
        for r in range(reps):
            for name, *_ in SCENARIOS:
                fg = Foreign().start()
                res = bench.run(name, dur)
                res.update(fg.stop())
                raw[name].append(res)
            print(f"  round {r + 1}/{reps}: " + ", ".join(f"{n} {raw[n][-1]['ops_s']:,.0f}" for n, *_ in SCENARIOS),
                  flush=True)
        if args.profile:
            profile = profile_a1(bench, args.profile_seconds)
    finally:
        bench.close()
    ray_result = measure_ray(reps, dur) if args.ray else None

    rows, results = [], {}
    for name, label, what, rts in SCENARIOS:
        runs = raw[name]
        s = summarize([x["ops_s"] for x in runs])
        cc = summarize([x["client_cpu_us"] for x in runs])
        bc = summarize([x["broker_cpu_us"] for x in runs])
        results[name] = {"label": label, "op": what, "broker_round_trips_per_op": rts, "ops_s": s,
                         "client_cpu_us_per_op": cc, "broker_cpu_us_per_op": bc, "runs": runs}
        extra = ""
        if name in ("b", "b-many", "b-lease"):
            bo = summarize([x["b_only_ops_s"] for x in runs])
            results[name]["b_only_ops_s"] = bo
            extra = f"B-only {bo['median']:,.0f}/s"
        if name == "a2":
            per = summarize([v for x in runs for v in x["per_client_ops_s"]])
            results[name]["per_client_ops_s"] = per
            extra = f"per client {per['median']:,.0f}/s"
        if name.startswith("c"):
            wc = summarize([x["worker_cpu_us"] for x in runs])
            results[name]["worker_cpu_us_per_op"] = wc
            extra = f"worker CPU {wc['median']:.0f} us/item; client=driver"
        results[name]["foreign_cores"] = summarize([x["foreign_cores"] + x["steal_cores"] for x in runs])
        is_ref = name in REFS
        vs = "" if is_ref else f"{s['median'] / TARGET:.2f}x"
        rows.append([label, rts, fmt_rate(s), f"{s['spread_pct']:.0f}%", f"{1e6 / s['median']:.0f}",
                     f"{cc['median']:.0f}", f"{bc['median']:.0f}", vs,
                     f"{results[name]['foreign_cores']['median']:.2f}", extra])
    hdr = ["scenario", "broker RT/op", "ops/s median (min-max)", "spread", "wall us/op", "client CPU us/op",
           "broker CPU us/op", "vs 200k", "others' cores", "notes"]
    text = table(hdr, rows, title=f"broker rate, {reps} reps x {dur:.1f} s, 4 KiB float32 unless noted "
                                  f"(target >= {TARGET:,} ops/s with one client; Ray ~{RAY_GETS:,} gets/s)")
    trows = []
    for name, label, *_ in SCENARIOS:
        runs = raw[name]
        row = [label]
        for side in ("client", "broker"):
            for kind in ("main", "zmq-io"):
                vals = [x[f"{side}_threads_s"][kind] / max(1, x["ops"]) * 1e6 for x in runs]
                results[name][f"{side}_{kind}_cpu_us_per_op"] = summarize(vals)
                row.append(f"{summarize(vals)['median']:.0f}")
        trows.append(row)
    ttext = table(["scenario", "client Python thread", "client ZMQ I/O thread", "broker Python thread",
                   "broker ZMQ I/O thread"], trows,
                  title="CPU us per op by thread (median; /proc/PID/task/TID/stat; for c the client is the driver; "
                        "for the echo refs the broker is the echo server)")
    print()
    print(text)
    print()
    print(ttext)
    a1 = results["a1"]["ops_s"]["median"]
    verdict = "met" if a1 >= TARGET else "MISSED"
    print(f"\nsmall operations goal of issue 13, >= {TARGET:,} put+get+release (4 KiB) per second with one "
          f"client: {verdict} (a1 median {a1:,.0f} ops/s, min-max {results['a1']['ops_s']['min']:,.0f}-"
          f"{results['a1']['ops_s']['max']:,.0f}; {a1 / TARGET:.2f}x the goal, {a1 / RAY_GETS:.2f}x Ray's gets/s; "
          f"the machine is noisy: one run is indicative)")
    if ray_result is not None:
        if "skipped" in ray_result:
            print(f"\nray: skipped ({ray_result['skipped']})")
        else:
            for key, label in (("put_get", "ray put+get+del 4 KiB, 1 client"), ("get", "ray get of one ref")):
                st = ray_result[key]
                print(f"\n{label}: {fmt_rate(st)} ops/s (after the rounds above, {reps} reps); "
                      f"shmbroker a1 / this = {a1 / st['median']:.1f}x")
    if profile is not None:
        for who in ("broker", "client"):
            pr = profile.get(who, {})
            if "top_self" in pr:
                print(f"\npy-spy --gil, {who} during a1 ({profile['a1_ops_s_while_profiled']:,.0f} ops/s): "
                      f"~{pr['gil_us_per_op_est']:.0f} us of Python per op; top self time:")
                for f, pct in pr["top_self"][:8]:
                    print(f"  {pct:5.1f}%  {f}")
    data = {"machine": machine,
            "config": {"reps": reps, "seconds_per_rep": dur, "item_bytes": ITEM_BYTES, "quick": args.quick,
                       "interleaved": True, "warmup_rounds": 1, "argv": sys.argv[1:]},
            "target_ops_s": TARGET, "ray_gets_s": RAY_GETS, "verdict_a1": verdict,
            "results": results, "table": text, "thread_table": ttext, "profile": profile, "ray": ray_result,
            "elapsed_s": time.monotonic() - t_start}
    write_json(args.out, data)
    print(f"\nwrote {args.out}")

    def draw(plt: Any) -> None:
        names = [s[0] for s in SCENARIOS]
        med = [results[n]["ops_s"]["median"] for n in names]
        lo = [results[n]["ops_s"]["median"] - results[n]["ops_s"]["min"] for n in names]
        hi = [results[n]["ops_s"]["max"] - results[n]["ops_s"]["median"] for n in names]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        colors = ["tab:gray" if n in REFS else "tab:blue" for n in names]
        ax.bar(names, med, yerr=[lo, hi], color=colors, capsize=3)
        ax.axhline(TARGET, color="tab:red", ls="--", label=f"target {TARGET:,}/s")
        ax.axhline(RAY_GETS, color="tab:orange", ls=":", label=f"Ray gets {RAY_GETS:,}/s")
        ax.set_ylabel("ops/s (median, min-max)")
        ax.set_title(f"shmbroker small-op rate ({machine['date'][:10]}, {machine['cpu_count']} cores)")
        ax.legend()

    maybe_plot(args.out.with_suffix(".png"), draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
