#!/usr/bin/env python
"""Hand-off latency of shmbroker vs. its peers, and ``put`` bandwidth vs. ``np.copyto``.

One command, one run, every number comparable::

    .venv/bin/python benchmarks/handoff.py [--sizes 4KiB,1MiB,16MiB,128MiB] [--repeat N]
                                           [--quick] [--out benchmarks/results/handoff.json]

What is measured (float32 arrays of each size)
----------------------------------------------
Hand-off: the producer (this process) already holds the data in the form its
transport wants (shmbroker: a Handle from ``put``; torch queue: a tensor after
``share_memory_()``; the others: a NumPy array). The clock starts with
``t0 = time.perf_counter()`` in the producer just before it sends, and stops
in the consumer (a separate, persistent ``spawn`` process, idle in its
receive call) once it holds a torch tensor and has read one element (column
"touch 1") and again after ``t.sum()`` has read all of it (column "read all").
The clock is CLOCK_MONOTONIC, system wide on Linux, so the two timestamps of
a one-way trip are comparable across processes; no round trip is halved.

Peers: shmbroker (Handle pickled over a ``multiprocessing.Pipe``; the
consumer's ``Client.tensor`` takes a lease, one broker round trip), shmbroker
with a granted Handle (the producer's ``Client.grant`` -- one message, no
reply -- is inside the timed window; the consumer maps the array at once and
claims the lease without waiting), the same with the grant made before the
clock (as the torch peer's ``share_memory_()`` is), a
``multiprocessing.Queue`` carrying the array, a ``torch.multiprocessing.Queue``
carrying a shared-memory tensor, and pyzmq PUSH/PULL over ipc with
``copy=False`` frames. References: a zmq ipc REQ/REP round trip of a tiny
msgpack message (the messaging floor), a one-way ``Pipe`` send of a tiny
object (the channel shmbroker's handle rides on), and an in-process
``np.copyto`` of each size (the copy floor).

Put bandwidth: ``Client.put`` (alloc round trip + the one copy) against
``np.copyto`` into a preallocated, pre-faulted array, interleaved rep by rep.
Each put is released before the next, so the allocator hands back the same
warm block: first-touch page faults of the arena are excluded by the warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _bench_util  # noqa: E402  (after the path is set, as rate.py does)

MiB = 2**20
DEFAULT_SIZES = "4KiB,1MiB,16MiB,128MiB"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "handoff.json"
FILL = 0.5  # every element of every array; the consumer checks it reads this
GAP_S = 0.001  # idle time before each send, so the consumer is blocked in its receive
REPLY_TIMEOUT_S = 120.0
UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}

PEERS = {  # key -> label in the tables and the plot
    "shmbroker": "shmbroker (Handle over mp.Pipe)",
    "shmbroker_grant": "shmbroker, granted Handle (grant + send timed)",
    "shmbroker_granted": "shmbroker, Handle granted before the clock",
    "shmbroker_fresh": "shmbroker, new put before each send",
    "mpqueue": "multiprocessing.Queue (ndarray)",
    "torchqueue": "torch.multiprocessing.Queue (shared tensor)",
    "zmq": "pyzmq PUSH/PULL ipc, copy=False",
}

pc = time.perf_counter


# -- helpers ------------------------------------------------------------------------
def parse_size(text: str) -> int:
    s = text.strip().lower().replace(" ", "")
    for unit in sorted(UNITS, key=len, reverse=True):
        if s.endswith(unit) and s[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * UNITS[unit])
    if s.isdigit():
        return int(s)
    raise argparse.ArgumentTypeError(f"cannot read size {text!r}; use e.g. 4KiB, 1MiB, 128MiB")


def size_label(n: int) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    return f"{n} B"


def default_reps(nbytes: int, quick: bool) -> int:
    if nbytes <= MiB:
        return 30 if quick else 200
    if nbytes <= 16 * MiB:
        return 10 if quick else 50
    return 5 if quick else 20


def warmup_reps(reps: int) -> int:
    return max(3, reps // 10)


def stats_us(samples: list[float]) -> dict[str, Any]:
    a = np.asarray(samples) * 1e6
    p50, p99 = np.percentile(a, [50, 99])
    return {"p50_us": round(float(p50), 2), "p99_us": round(float(p99), 2),
            "min_us": round(float(a.min()), 2), "max_us": round(float(a.max()), 2), "n": len(a)}


def filled(nbytes: int) -> np.ndarray:
    if nbytes % 4:
        raise SystemExit(f"size {nbytes} B is not a whole number of float32 elements")
    return np.full(nbytes // 4, FILL, dtype=np.float32)  # written, so its pages are faulted in


def machine_info() -> dict[str, Any]:
    info = _bench_util.machine_info()
    info["torch_threads_consumer"] = 1
    info["clock"] = str(time.get_clock_info("perf_counter"))
    return info


# -- consumer processes ---------------------------------------------------------------
def _child_init() -> None:
    """Die with the parent (even if it is SIGKILLed); leave Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() == 1:
        os._exit(1)


def consumer_main(kind: str, ctrl: Any, data: Any, cfg: dict[str, Any]) -> None:
    """Entry point of every consumer process; reports errors over ``ctrl``."""
    _child_init()
    try:
        _consume(kind, ctrl, data, cfg)
    except BaseException:
        try:
            ctrl.send(("error", traceback.format_exc()))
        except Exception:
            pass
        sys.exit(1)


def _consume(kind: str, ctrl: Any, data: Any, cfg: dict[str, Any]) -> None:
    import msgpack
    import torch
    import zmq

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*not writable.*")

    if kind == "reqrep":
        zctx = zmq.Context()
        rep = zctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        rep.connect(cfg["endpoint"])
        ctrl.send(("ready",))
        while True:
            msg = msgpack.unpackb(rep.recv())
            rep.send(msgpack.packb({"op": "ok", "t": msg["t"]}))
            if msg["op"] == "stop":
                break
        rep.close(0)
        zctx.term()
        return

    client: Any = None
    pull: Any = None
    ctx: Any = None
    if kind == "shmbroker":
        from broker import Client

        client = Client(cfg["endpoint"], role="bench-consumer")
    elif kind == "zmq":
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.connect(cfg["endpoint"])

    def receive() -> tuple[tuple[float, bool], Any, Any] | None:
        """Block for the next item: ``((t0, read_all), tensor or None, cleanup or None)``; None: stop."""
        if kind in ("shmbroker", "pipe"):
            item = data.recv()
            if item is None:
                return None
            stamp, h = item
            if kind == "pipe":
                return stamp, None, None
            return stamp, client.tensor(h), (lambda: client.release(h))
        if kind == "mpqueue":
            item = data.get()
            if item is None:
                return None
            stamp, arr = item
            return stamp, torch.from_numpy(arr), None
        if kind == "torchqueue":
            item = data.get()
            if item is None:
                return None
            return item[0], item[1], None
        if kind == "zmq":
            frames = pull.recv_multipart(copy=False)
            if len(frames) == 1:
                return None
            t0, read_all, dtype, shape = msgpack.unpackb(frames[0].bytes)
            arr = np.frombuffer(frames[1].buffer, dtype=dtype).reshape(shape)
            return (t0, read_all), torch.from_numpy(arr), None
        raise ValueError(f"unknown consumer kind {kind!r}")

    ctrl.send(("ready",))
    while True:
        got = receive()
        if got is None:
            break
        (t0, read_all), t, cleanup = got
        del got
        if t is None:
            t1 = pc()
            value = FILL
        elif read_all:
            float(t.sum())
            t1 = pc()
            value = float(t.view(-1)[0])
        else:
            value = float(t.view(-1)[0])
            t1 = pc()
        del t
        if cleanup is not None:
            cleanup()
        ctrl.send((t1 - t0, value))
    if client is not None:
        client.close()
    if pull is not None:
        pull.close(0)
        ctx.term()
    ctrl.send(("bye",))


class Consumer:
    """A spawned consumer process and the producer's end of its control pipe."""

    live: list[Consumer] = []

    def __init__(self, ctx: Any, kind: str, data_for_child: Any, cfg: dict[str, Any]) -> None:
        self.kind = kind
        self.ctrl, child_ctrl = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=consumer_main, args=(kind, child_ctrl, data_for_child, cfg),
                                name=f"consumer-{kind}", daemon=True)
        Consumer.live.append(self)
        self.proc.start()
        child_ctrl.close()
        if hasattr(data_for_child, "close") and kind in ("shmbroker", "pipe"):
            data_for_child.close()  # the child has its own copy; ours would hide its death
        self.expect("ready")

    def reply(self, what: str) -> Any:
        if not self.ctrl.poll(REPLY_TIMEOUT_S):
            raise TimeoutError(f"consumer {self.kind} sent nothing for {REPLY_TIMEOUT_S:.0f} s ({what})")
        try:
            msg = self.ctrl.recv()
        except EOFError:
            raise RuntimeError(f"consumer {self.kind} exited (code {self.proc.exitcode}) during {what}") \
                from None
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise RuntimeError(f"consumer {self.kind} failed during {what}:\n{msg[1]}")
        return msg

    def expect(self, word: str) -> None:
        msg = self.reply(word)
        if msg != (word,):
            raise RuntimeError(f"consumer {self.kind}: expected {word!r}, got {msg!r}")

    def finish(self) -> None:
        self.expect("bye")
        self.stop()

    def stop(self, grace: float = 3.0) -> None:
        if self.proc.is_alive() and grace:
            self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.ctrl.close()
        if self in Consumer.live:
            Consumer.live.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for c in list(cls.live):  # an abnormal exit: nothing to wait for
            try:
                c.stop(grace=0)
            except Exception:
                pass


# -- producer side of each peer ----------------------------------------------------------
class Peer:
    """How the producer hands one item to a consumer of ``kind``; results are filed under ``key``."""

    kind = ""

    _key = ""

    @property
    def key(self) -> str:
        return self._key or self.kind

    def open(self, ctx: Any) -> tuple[Any, dict[str, Any]]:  # -> (data channel for the child, cfg)
        raise NotImplementedError

    def prepare(self, nbytes: int) -> Any:  # once per size, untimed
        return filled(nbytes)

    def before(self, payload: Any) -> Any:  # each rep, untimed
        return payload

    def send(self, stamp: tuple[float, bool], item: Any) -> None:  # timed: starts the hand-off
        raise NotImplementedError

    def after(self, item: Any) -> None:  # each rep, after the consumer replied, untimed
        pass

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PipePeer(Peer):
    """A tiny object over a one-way ``Pipe``: the channel shmbroker's handle rides on."""

    kind = "pipe"

    def open(self, ctx: Any) -> tuple[Any, dict[str, Any]]:
        r, self.w = ctx.Pipe(duplex=False)
        return r, {}

    def prepare(self, nbytes: int) -> Any:
        return None

    def send(self, stamp: tuple[float, bool], item: Any) -> None:
        self.w.send((stamp, item))

    def stop(self) -> None:
        self.w.send(None)

    def close(self) -> None:
        self.w.close()


class ShmbrokerPeer(PipePeer):
    """The producer holds a Handle; the consumer acquires (and later releases) a lease per hand-off.

    ``fresh=False``: one ``put`` per size, the same Handle re-sent every rep.
    ``fresh=True``: a new ``put`` before every send (released after the reply), so the
    consumer and the broker sit idle while the producer copies the array.
    """

    kind = "shmbroker"

    def __init__(self, client: Any, fresh: bool = False, grant: str = "") -> None:
        self.client = client
        self.fresh = fresh
        self.grant = grant  # "" | "timed" | "before"
        self._key = "shmbroker_fresh" if fresh else {"": "shmbroker", "timed": "shmbroker_grant",
                                                     "before": "shmbroker_granted"}[grant]
        self.held: Any = None

    def send(self, stamp: tuple[float, bool], item: Any) -> None:
        # grant "timed": the producer grants the consumer a lease (one message, no reply) inside
        # the timed window; the consumer's get then maps the array and claims without waiting.
        # "before": the grant was made in before(), as the torch peer's share_memory_() is
        self.w.send((stamp, self.client.grant(item) if self.grant == "timed" else item))

    def open(self, ctx: Any) -> tuple[Any, dict[str, Any]]:
        r, _ = super().open(ctx)
        return r, {"endpoint": self.client.endpoint}

    def prepare(self, nbytes: int) -> Any:
        src = filled(nbytes)
        if self.fresh:
            return src
        self._drop_held()
        self.held = self.client.put(src)
        return self.held

    def before(self, payload: Any) -> Any:
        if self.grant == "before":
            return self.client.grant(payload)
        return self.client.put(payload) if self.fresh else payload

    def after(self, item: Any) -> None:
        if self.fresh:
            self.client.release(item)

    def _drop_held(self) -> None:
        if self.held is not None:
            self.client.release(self.held)
            self.held = None

    def close(self) -> None:
        self._drop_held()
        super().close()


class MPQueuePeer(Peer):
    kind = "mpqueue"

    def open(self, ctx: Any) -> tuple[Any, dict[str, Any]]:
        self.q = ctx.Queue()
        self.q.cancel_join_thread()  # never hang at exit on an unread item
        return self.q, {}

    def send(self, stamp: tuple[float, bool], item: Any) -> None:
        self.q.put((stamp, item))

    def stop(self) -> None:
        self.q.put(None)

    def close(self) -> None:
        self.q.close()


class TorchQueuePeer(MPQueuePeer):
    kind = "torchqueue"

    def open(self, ctx: Any) -> tuple[Any, dict[str, Any]]:
        import torch.multiprocessing as tmp

        self.q = tmp.get_context("spawn").Queue()
        self.q.cancel_join_thread()
        return self.q, {}

    def prepare(self, nbytes: int) -> Any:
        import torch

        t = torch.from_numpy(filled(nbytes))
        t.share_memory_()  # moves the storage to shared memory, before any clock starts
        return t


class ZmqPeer(Peer):
    kind = "zmq"

    def __init__(self, tmpdir: str) -> None:
        self.path = os.path.join(tmpdir, "push.sock")

    def open(self, ctx: Any) -> tuple[Any, dict[str, Any]]:
        import msgpack
        import zmq

        self.packb = msgpack.packb
        self.zctx = zmq.Context()
        self.push = self.zctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(f"ipc://{self.path}")
        return None, {"endpoint": f"ipc://{self.path}"}

    def send(self, stamp: tuple[float, bool], item: Any) -> None:
        self.push.send_multipart([self.packb([*stamp, item.dtype.str, list(item.shape)]), item], copy=False)

    def stop(self) -> None:
        self.push.send(b"")

    def close(self) -> None:
        self.push.close(0)
        self.zctx.term()


def run_handoff(ctx: Any, peer: Peer, sizes: list[int], reps_for: Any, progress: Any,
                modes: tuple[str, ...] = ("touch", "read_all")) -> dict[str, Any]:
    """One persistent consumer; for each size and mode, warm up then time ``reps`` one-way hand-offs.

    The two modes are separate passes, so a whole-tensor read in one rep cannot slow the
    touch-one-element rep after it (it evicts caches and lengthens everyone's idle time).
    """
    data, cfg = peer.open(ctx)
    cons = Consumer(ctx, peer.kind, data, cfg)
    out: dict[str, Any] = {}
    try:
        for nbytes in sizes:
            reps = reps_for(nbytes)
            payload = peer.prepare(nbytes)
            started = pc()
            res: dict[str, Any] = {"nbytes": nbytes}
            for mode in modes:
                samples: list[float] = []
                bad = 0
                for i in range(warmup_reps(reps) + reps):
                    item = peer.before(payload)
                    time.sleep(GAP_S)
                    peer.send((pc(), mode == "read_all"), item)
                    dt, value = cons.reply(f"{size_label(nbytes)} {mode} rep {i}")
                    peer.after(item)
                    del item
                    if value != FILL:
                        bad += 1
                    if i >= warmup_reps(reps):
                        samples.append(dt)
                if bad:
                    raise RuntimeError(f"{peer.key}: consumer read a wrong value in {bad} reps")
                res[mode] = stats_us(samples)
            del payload
            gc.collect()
            out[str(nbytes)] = res
            progress(f"  {peer.key:<15} {size_label(nbytes):>8}: touch p50 {out[str(nbytes)]['touch']['p50_us']:>10.1f} µs"
                     f"  ({reps} reps, {pc() - started:.1f} s)")
        peer.stop()
        cons.finish()
    finally:
        cons.stop(grace=0)  # a no-op after finish(); on an error or Ctrl-C, no waiting
        peer.close()
    return out


def run_reqrep(ctx: Any, tmpdir: str, reps: int) -> dict[str, Any]:
    import msgpack
    import zmq

    path = f"ipc://{os.path.join(tmpdir, 'req.sock')}"
    zctx = zmq.Context()
    req = zctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.bind(path)
    cons = Consumer(ctx, "reqrep", None, {"endpoint": path})
    rtt: list[float] = []
    try:
        for i in range(warmup_reps(reps) + reps):
            time.sleep(GAP_S)
            t0 = pc()
            req.send(msgpack.packb({"op": "ping", "t": t0}))
            if not req.poll(int(REPLY_TIMEOUT_S * 1000)):
                raise TimeoutError("no REP reply")
            msgpack.unpackb(req.recv())
            if i >= warmup_reps(reps):
                rtt.append(pc() - t0)
        req.send(msgpack.packb({"op": "stop", "t": 0.0}))
        req.poll(int(REPLY_TIMEOUT_S * 1000))
        req.recv()
        cons.stop()
    finally:
        cons.stop(grace=0)
        req.close(0)
        zctx.term()
    return stats_us(rtt)


def run_ping(client: Any, reps: int) -> dict[str, Any]:
    """``Client.ping()``: one request/reply with the broker, the floor of ``get``'s acquire."""
    rtt = []
    for i in range(warmup_reps(reps) + reps):
        time.sleep(GAP_S)
        dt = client.ping()
        if i >= warmup_reps(reps):
            rtt.append(dt)
    return stats_us(rtt)


# -- in-process measurements -------------------------------------------------------------
def run_put(client: Any, sizes: list[int], reps_for: Any, progress: Any) -> dict[str, Any]:
    """``Client.put`` vs ``np.copyto`` into a pre-faulted array, interleaved rep by rep."""
    out: dict[str, Any] = {}
    for nbytes in sizes:
        reps = reps_for(nbytes)
        src = filled(nbytes)
        dst = np.zeros_like(src)
        dst.fill(1.0)  # pre-faulted
        puts: list[float] = []
        copies: list[float] = []
        for i in range(warmup_reps(reps) + reps):
            t = pc()
            h = client.put(src)
            dt_put = pc() - t
            client.release(h)  # the next put gets the same warm block (a pooled size, <= 64 KiB: the
            # client's next pool block, warm after the first rounds)
            t = pc()
            np.copyto(dst, src)
            dt_copy = pc() - t
            if i >= warmup_reps(reps):
                puts.append(dt_put)
                copies.append(dt_copy)
        p, c = stats_us(puts), stats_us(copies)
        put_gbs = nbytes / (p["p50_us"] * 1e-6) / 1e9
        copy_gbs = nbytes / (c["p50_us"] * 1e-6) / 1e9
        out[str(nbytes)] = {"nbytes": nbytes, "put": p, "copyto": c, "put_GBps": round(put_gbs, 3),
                            "copyto_GBps": round(copy_gbs, 3), "ratio": round(put_gbs / copy_gbs, 4)}
        progress(f"  put       {size_label(nbytes):>8}: {put_gbs:7.2f} GB/s vs copyto {copy_gbs:7.2f} GB/s")
        del src, dst
        gc.collect()
    return out


# -- output ---------------------------------------------------------------------------------
NOTES = [
    "Hand-off is one-way: t0 = time.perf_counter() in the producer just before it sends, t1 in the "
    "consumer process once it holds a torch tensor and has read one element (touch 1), or has "
    "read all of it with t.sum() (read all; a separate pass of reps). perf_counter is "
    "CLOCK_MONOTONIC, system wide on Linux; no round trip is halved.",
    "Before the clock: shmbroker's array is already put (the producer holds a Handle); the torch "
    "queue's tensor already had share_memory_(); the others send a plain ndarray. The consumer is "
    "a persistent spawn process, idle in its receive call (1 ms gap before each send).",
    "shmbroker: the array is put once per size and the same Handle re-sent each rep; the consumer "
    "takes a lease per hand-off (Client.get -> acquire, one broker round trip) and releases it after "
    "the clock stops. 'new put before each send' puts (and releases) around every send instead: "
    "consumer and broker then idle for the put's duration, and on this VM a process's first "
    "instructions after a long idle run much slower (benchmarks/NOTES.md).",
    "put: arena pages are warm (each put is released, the allocator reuses the same block; "
    "first-touch faults are excluded by the warm-up). np.copyto writes into a preallocated, "
    "pre-faulted array. GB/s = bytes / p50 time. put includes its alloc round trip.",
    "p99 of n < 100 samples is close to the max. Consumer torch threads: 1. Machine is shared/noisy.",
]


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    sizes = result["config"]["sizes"]
    cols = [size_label(n) for n in sizes]

    t = Table(title="Hand-off latency, one-way, µs: p50 / p99 (n per size: "
                    + ", ".join(str(result["config"]["reps"][str(n)]) for n in sizes) + ")")
    t.add_column("peer")
    t.add_column("consumer reads")
    for c in cols:
        t.add_column(c, justify="right")

    def cell(s: dict[str, Any]) -> str:
        return f"{s['p50_us']:,.1f} / {s['p99_us']:,.1f}"

    for key, label in PEERS.items():
        res = result["handoff"].get(key)
        if res is None:
            continue
        t.add_row(label, "touch 1", *[cell(res[str(n)]["touch"]) for n in sizes])
        t.add_row("", "read all", *[cell(res[str(n)]["read_all"]) for n in sizes], end_section=True)
    ref = result["references"]
    t.add_row("ref: np.copyto in-process (copy floor)", "-",
              *[cell(result["put"][str(n)]["copyto"]) for n in sizes])
    t.add_row("ref: zmq ipc REQ/REP tiny msgpack, ROUND TRIP", "-", *[cell(ref["zmq_reqrep_rtt"])] * len(sizes))
    t.add_row("ref: Client.ping() to the broker, ROUND TRIP", "-", *[cell(ref["broker_ping_rtt"])] * len(sizes))
    t.add_row("ref: mp.Pipe one-way, tiny object", "-", *[cell(ref["pipe_oneway_tiny"])] * len(sizes))
    for k, why in result["skipped"].items():
        t.add_row(f"{k}: skipped", why, *[""] * len(sizes))
    console.print(t)

    p = Table(title="put bandwidth: Client.put (alloc round trip + one copy) vs np.copyto "
                    "into a pre-faulted array; arena pages warm")
    for c in ("size", "put p50 µs", "put p99 µs", "put GB/s", "copyto p50 µs", "copyto GB/s", "put / copyto"):
        p.add_column(c, justify="right")
    for n in sizes:
        r = result["put"][str(n)]
        p.add_row(size_label(n), f"{r['put']['p50_us']:,.1f}", f"{r['put']['p99_us']:,.1f}",
                  f"{r['put_GBps']:.2f}", f"{r['copyto']['p50_us']:,.1f}", f"{r['copyto_GBps']:.2f}",
                  f"{100 * r['ratio']:.0f}%")
    console.print(p)
    for note in NOTES:
        console.print(f"- {note}", highlight=False)


def plot(result: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"plot skipped: matplotlib is not installed ({e}); `.venv/bin/pip install matplotlib`"
    sizes = result["config"]["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    ref = result["references"]
    for ax, col, title in ((axes[0], "touch", "consumer touches one element"),
                           (axes[1], "read_all", "consumer reads the whole tensor (t.sum())")):
        for key, label in PEERS.items():
            res = result["handoff"].get(key)
            if res is None:
                continue
            p50 = [res[str(n)][col]["p50_us"] for n in sizes]
            p99 = [res[str(n)][col]["p99_us"] for n in sizes]
            ax.errorbar(sizes, p50, yerr=[[0] * len(sizes), [b - a for a, b in zip(p50, p99, strict=True)]],
                        marker="o", capsize=3, label=label)
        ax.plot(sizes, [result["put"][str(n)]["copyto"]["p50_us"] for n in sizes], "k--", marker="x",
                label="ref: np.copyto in-process")
        ax.axhline(ref["zmq_reqrep_rtt"]["p50_us"], color="grey", ls=":",
                   label="ref: zmq REQ/REP tiny round trip")
        ax.axhline(ref["broker_ping_rtt"]["p50_us"], color="tab:brown", ls=":",
                   label="ref: Client.ping() round trip")
        ax.axhline(ref["pipe_oneway_tiny"]["p50_us"], color="tab:olive", ls="-.",
                   label="ref: mp.Pipe one-way tiny")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_label(n) for n in sizes])
        ax.set_xlabel("array size (float32)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("one-way hand-off latency, µs (p50, bar to p99)")
    axes[0].legend(fontsize=7.5, loc="upper left")
    m = result["machine"]
    fig.suptitle(f"shmbroker hand-off vs peers — {m['cpu_count']} CPUs, {m['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def targets(result: dict[str, Any]) -> list[str]:
    """The issue's hand-off and put targets, checked against this run's touch-1 p50s."""
    sizes = [str(n) for n in result["config"]["sizes"]]
    ho, ref = result["handoff"], result["references"]
    rtt = ref["zmq_reqrep_rtt"]["p50_us"]

    def p50(key: str, n: str) -> float:
        return float(ho[key][n]["touch"]["p50_us"])

    out = [f"targets (touch 1, p50; zmq round trip {rtt:.0f} µs):"]
    for key in ("shmbroker", "shmbroker_grant", "shmbroker_granted"):
        if key not in ho:
            continue
        v = [p50(key, n) for n in sizes]
        line = (f"  {PEERS[key]}: flat {max(v) / min(v):.2f}x max/min; "
                f"within 2x round trip at every size: {'met' if max(v) <= 2 * rtt else 'MISSED'} "
                f"(max {max(v):.0f} µs vs {2 * rtt:.0f})")
        if "4096" in sizes and "torchqueue" in ho:
            r = p50("torchqueue", "4096") / p50(key, "4096")
            line += f"; 4 KiB {r:.1f}x faster than torch queue ({'met' if r >= 5 else 'MISSED'}, >= 5x)"
        if str(16 << 20) in sizes and "mpqueue" in ho:
            r = p50("mpqueue", str(16 << 20)) / p50(key, str(16 << 20))
            line += f"; 16 MiB {r:.0f}x faster than mp.Queue ({'met' if r >= 20 else 'MISSED'}, >= 20x)"
        out.append(line)
    for n in sizes:
        if int(n) >= 16 << 20:
            r = result["put"][n]["ratio"]
            out.append(f"  put {size_label(int(n))}: {r:.0%} of np.copyto ({'met' if r >= 0.8 else 'MISSED'}, >= 80%)")
    return out


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    global GAP_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated (default {DEFAULT_SIZES})")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed reps per size for every case (default: 200 up to 1 MiB, 50 up to "
                         "16 MiB, 20 above; --quick: 30/10/5)")
    ap.add_argument("--quick", action="store_true", help="fewer reps: a run of about 30 s")
    ap.add_argument("--capacity", type=parse_size, default=512 * MiB, help="broker arena (default 512MiB)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--gap-ms", type=float, default=GAP_S * 1e3,
                    help="idle time before each send, ms (default %(default)s)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    GAP_S = args.gap_ms / 1e3
    sizes = sorted({parse_size(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes:
        ap.error("--sizes is empty")
    if max(sizes) > args.capacity:
        ap.error(f"largest size {size_label(max(sizes))} exceeds --capacity {size_label(args.capacity)}")

    def reps_for(n: int) -> int:
        return args.repeat if args.repeat else default_reps(n, args.quick)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so every finally below runs and no child outlives us.
    def on_term(*_: Any) -> None:
        progress("terminated (SIGTERM); stopping consumers and the broker")
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)

    import torch

    from broker import Broker, Client

    torch.set_num_threads(1)
    started = pc()
    skipped: dict[str, str] = {}
    try:
        import ray  # noqa: F401

        skipped["ray"] = ("importable, but no Ray peer: an ObjectRef handed to another driver process "
                          "over a Pipe blocked in ray.get for minutes in a test here (ray 2.60.0, "
                          "2026-11-22); Ray's object-store rate is in rate.py --ray")
    except ImportError as e:
        skipped["ray"] = f"not importable ({e})"
    progress(f"ray: skipped, {skipped['ray']}")

    ctx = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="shmbroker-bench-")
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {"sizes": sizes, "reps": {str(n): reps_for(n) for n in sizes},
                   "warmup": {str(n): warmup_reps(reps_for(n)) for n in sizes},
                   "quick": args.quick, "capacity": args.capacity, "dtype": "float32",
                   "gap_before_send_s": GAP_S, "argv": sys.argv[1:]},
        "notes": NOTES,
        "skipped": skipped,
        "handoff": {},
        "references": {},
    }
    try:
        with Broker(capacity=args.capacity) as broker, Client(broker.endpoint, role="bench-producer") as client:
            progress(f"broker pid {broker.pid}, arena {size_label(args.capacity)}")
            result["put"] = run_put(client, sizes, reps_for, progress)
            peers: list[Peer] = [ShmbrokerPeer(client), ShmbrokerPeer(client, grant="timed"),
                                  ShmbrokerPeer(client, grant="before"),
                                  ShmbrokerPeer(client, fresh=True), MPQueuePeer(), TorchQueuePeer(), ZmqPeer(tmpdir)]
            for peer in peers:
                result["handoff"][peer.key] = run_handoff(ctx, peer, sizes, reps_for, progress)
            tiny_reps = reps_for(1)
            result["references"]["pipe_oneway_tiny"] = run_handoff(
                ctx, PipePeer(), [4], lambda _n: tiny_reps, lambda _m: None, ("touch",))["4"]["touch"]
            result["references"]["zmq_reqrep_rtt"] = run_reqrep(ctx, tmpdir, tiny_reps)
            result["references"]["broker_ping_rtt"] = run_ping(client, tiny_reps)
            progress(f"  references: Pipe one-way {result['references']['pipe_oneway_tiny']['p50_us']:.1f} µs, "
                     f"REQ/REP round trip {result['references']['zmq_reqrep_rtt']['p50_us']:.1f} µs, "
                     f"broker ping {result['references']['broker_ping_rtt']['p50_us']:.1f} µs")
            result["broker_stats_after"] = {k: v for k, v in client.stats().items()
                                            if k in ("capacity", "used", "peak", "objects")}
    except KeyboardInterrupt:
        progress("interrupted; stopping consumers and the broker")
        return 130
    finally:
        Consumer.stop_all()
        shutil.rmtree(tmpdir, ignore_errors=True)
    result["elapsed_s"] = round(pc() - started, 1)
    result["machine"]["loadavg_at_end"] = os.getloadavg()

    render(result)
    result["targets"] = targets(result)
    for line in result["targets"]:
        print(line)
    load0, load1 = result["machine"]["loadavg_at_start"][0], result["machine"]["loadavg_at_end"][0]
    print(f"load average (1 min): {load0:.2f} at start, {load1:.2f} at end, on {os.cpu_count()} CPUs "
          f"(this benchmark itself keeps about one CPU busy)")
    if load0 > 0.5 or load1 > 1.5:
        print("WARNING: other processes were using the CPUs during this run; its numbers are slower "
              "and noisier than on a quiet machine")
    write_json(result, args.out)
    print(f"json: {args.out}")
    if not args.no_plot:
        print(plot(result, args.out.with_suffix(".png")))
    print(f"elapsed: {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
