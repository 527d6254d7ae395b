"""The ``shmbroker`` command: run, broker, worker, status, validate, doctor, keys, cleanup.

``run`` stops gracefully on SIGTERM (exit status 143) and Ctrl-C (130): the
signal handlers only ask the pipeline to stop (``graceful_stop``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shlex
import signal
import sys
import time
from typing import Any, Iterator

from broker.errors import BrokerError, format_bytes

log = logging.getLogger("shmbroker.cli")


DESCRIPTION = """\
Pipelines of NumPy arrays moved between processes through one shared-memory arena:
a YAML file names a source, CPU/GPU stages and a sink.

  shmbroker run FILE        run a pipeline to the end of its source
  shmbroker validate FILE   check a pipeline file without starting anything
  shmbroker doctor [FILE]   check this host (or the file's Ray cluster) against a pipeline file

Docs: README.md and docs/pipelines.md in the repository."""

SET_HELP = "override a config value, e.g. --set stages.infer.batch=8; VALUE null (or ~) unsets the key"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)


def _device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, not {value!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shmbroker", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND")

    p = sub.add_parser("run", help="run a pipeline from a YAML file to the end of its source")
    p.add_argument("file", help="the pipeline's YAML file")
    _overrides(p)
    p.add_argument("--require-gpu", action="store_true",
                   help="fail instead of running a GPU stage (device: cuda, cuda:N or auto) on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no live progress line on the terminal")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in the npy sink's directory (stopped by Ctrl-C, "
                        "SIGTERM, kill -9 or a crash): items already done are left out; refused if "
                        "the config or the source files differ")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a sink directory that is not empty (its result files, "
                        "failures.jsonl and manifest are removed first)")
    _common(p)

    p = sub.add_parser("broker", help="start only the broker (for workers attached separately)")
    p.add_argument("--config", help="pipeline file whose broker and stages to use")
    p.add_argument("--capacity", help="arena size, e.g. 512MiB (default: the config's, else 256MiB)")
    p.add_argument("--endpoint", help="ipc://PATH or tcp://127.0.0.1:PORT (default: the config's, else "
                                      "an ipc socket in a new runtime directory)")
    _overrides(p)
    _common(p)

    p = sub.add_parser("worker", help="attach one worker for a stage to a running broker")
    p.add_argument("--config", required=True, help="the pipeline file the broker was started with")
    p.add_argument("--stage", required=True, help="the name of the stage this worker runs")
    p.add_argument("--device", type=_device,
                   help="cpu, cuda (the stage's planned GPU) or cuda:N; default: the stage's device")
    p.add_argument("--endpoint", help="the broker's endpoint (default: the config's, else the one live broker)")
    _overrides(p)
    _common(p)

    p = sub.add_parser("status", help="show a running broker: arena, stages, workers")
    p.add_argument("--endpoint", help="the broker's endpoint (default: the one live broker)")
    p.add_argument("--json", action="store_true", help="print the broker's statistics as JSON")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                   help="show it again every SECONDS (default 1) until Ctrl-C")
    p.add_argument("--cluster", nargs="?", const="auto", metavar="ADDRESS",
                   help="show every node of the cluster runs on this Ray cluster (default: a cluster run "
                        "of this host, found by itself)")
    _common(p)

    p = sub.add_parser("validate", help="check a pipeline file (and that its code imports) and exit")
    p.add_argument("file", help="the pipeline's YAML file")
    _overrides(p)
    _common(p)

    p = sub.add_parser("doctor", help="check this host against a pipeline file and print fixes")
    p.add_argument("file", nargs="?", help="the pipeline's YAML file (without it: the host only)")
    _overrides(p)
    p.add_argument("--require-gpu", action="store_true",
                   help="report a GPU stage (device: cuda, cuda:N or auto) that would run on the CPU as a failure")
    _common(p)

    p = sub.add_parser("keys", help="make CURVE certificates for a broker and its clients")
    p.add_argument("dir", help="directory to write the certificates to (made if missing)")
    p.add_argument("--force", action="store_true", help="replace certificates already in DIR")
    _common(p)

    p = sub.add_parser("cleanup", help="remove runtime directories of brokers that are gone")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    _common(p)
    return ap


def find_endpoint(endpoint: str | None) -> str:
    """The given endpoint, else the one live broker's in the runtime directory."""
    if endpoint:
        return endpoint
    from broker.rundir import base_dir, list_rundirs

    live = [e for e in list_rundirs() if e.live and "endpoint" in e.info]
    if not live:
        raise BrokerError(f"no running broker found in {base_dir()}; start one "
                          f"(`shmbroker broker --config FILE`) or pass --endpoint")
    if len(live) > 1:
        eps = ", ".join(e.info["endpoint"] for e in live)
        raise BrokerError(f"{len(live)} brokers are running ({eps}); pass --endpoint")
    return str(live[0].info["endpoint"])


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .driver import Interrupted, Pipeline
    from .output import MANIFEST
    from .plan import check_imports

    cfg = load_config(args.file, args.set)
    pipeline = Pipeline(cfg, path=args.file, require_gpu=args.require_gpu, log_level=args.log_level,
                        log_json=args.log_json, progress=not args.no_progress)
    output = None
    try:
        with graceful_stop(pipeline):
            output = pipeline.open_output(args.resume, args.overwrite)  # first: it is the quickest check
            check_imports(cfg, args.file)
            preflight(cfg, args.require_gpu)
            if pipeline.stop_signal:
                raise Interrupted(pipeline.stop_signal)
            with pipeline as p:
                summary = p.run(output=output)
    except Interrupted as e:
        if e.summary is None:  # before the run began
            print(f"shmbroker run: {e} before the run began; nothing was written", file=sys.stderr)
            return 128 + e.signum
        print_summary(e.summary, args.json)
        again = " ".join(["shmbroker run", shlex.quote(args.file), *(f"--set {shlex.quote(x)}" for x in args.set),
                          "--resume"])
        where = f"; the output in {output.directory} is incomplete (its {MANIFEST} says so): continue " \
                f"it with: {again}" if output is not None else ""
        print(f"shmbroker run: {e} after {e.summary.items} item(s){where}", file=sys.stderr)
        return 128 + e.signum
    finally:
        if output is not None:
            output.close()
    print_summary(summary, args.json)
    return 0


def print_summary(summary: Any, as_json: bool) -> None:
    from rich.console import Console

    if as_json:
        print(json.dumps(dict(summary.__dict__), default=str))
    else:
        Console(width=None if sys.stdout.isatty() else 110).print(summary.render())


@contextlib.contextmanager
def graceful_stop(pipeline: Any) -> Iterator[None]:
    """SIGTERM (``docker stop``, Kubernetes) and SIGINT (Ctrl-C) stop the run gracefully: the
    handler only asks the pipeline to stop. A second Ctrl-C stops at once; a second SIGTERM
    changes nothing (a process manager may send it to every process of the run)."""
    from .driver import Interrupted

    def handler(signum: int, _frame: Any) -> None:
        if pipeline.stop_signal and signum == signal.SIGINT:
            raise Interrupted(signum)
        pipeline.request_stop(pipeline.stop_signal or signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cmd_broker(args: argparse.Namespace) -> int:
    from broker.server import DEFAULT_WAIT, run_broker

    from .config import load_config, parse_size

    stages, inflight, metrics, curve, hwm, wait, pipeline = None, 0, None, None, 10_000, DEFAULT_WAIT, ""
    rings = False
    capacity = parse_size(args.capacity or "256MiB")
    endpoint = args.endpoint
    if args.config:
        # the stages run in the workers: their code need not be importable where the broker runs
        cfg = load_config(args.config, args.set)
        capacity = parse_size(args.capacity) if args.capacity else int(cfg.broker.capacity)
        endpoint = endpoint or cfg.broker.endpoint
        stages, inflight = [s.to_broker() for s in cfg.stages], cfg.broker.max_inflight
        metrics = cfg.broker.metrics_port
        hwm = cfg.broker.hwm
        wait = cfg.broker.wait_timeout
        curve = cfg.broker.curve.broker_args() if cfg.broker.curve else None
        pipeline = cfg.pipeline_id()
        rings = cfg.broker.rings

    def announce(info: dict[str, Any]) -> None:
        print(f"broker pid {info['pid']} ready at {info['endpoint']} "
              f"(arena {format_bytes(info['capacity'])})", flush=True)

    return run_broker(capacity, endpoint, None, stages, inflight, announce, metrics_port=metrics,
                      curve=curve, hwm=hwm, wait_timeout=wait, pipeline=pipeline, rings=rings)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.runtime import worker_main

    from .config import load_config
    from .plan import check_device, cuda_count, plan_devices, search_path

    # the broker's container holds the arena; this one's memory limit need not cover it
    cfg = load_config(args.config, args.set, check_host=False)
    stage = cfg.stage(args.stage)
    index = cfg.stages.index(stage)
    device = args.device
    count = cuda_count()
    if device is None or device == "cuda":  # the stage's planned device (its first replica's)
        override = {"replicas": 1} if device is None else {"replicas": 1, "device": "cuda"}
        device = plan_devices(stage.model_copy(update=override), count, warn=log.warning)[0]
    elif device != "cpu":
        check_device(device, count)
    spec = cfg.worker_spec(index, search_path(args.config))
    return worker_main(find_endpoint(args.endpoint or cfg.broker.endpoint), spec, device,
                       args.log_level, args.log_json,
                       cfg.broker.curve.client_args() if cfg.broker.curve else None)


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from broker.client import Client

    from .summary import render_status

    console = Console()
    if args.cluster or not args.endpoint:
        from .cluster.status import live_run

        run = None if args.cluster else live_run()
        if args.cluster or run is not None:
            return _cluster_status(args, console, run)
    with Client(find_endpoint(args.endpoint), role="status", timeout=5.0) as c:
        while True:
            st = c.stats()
            if args.json:
                print(json.dumps(st), flush=True)
            else:
                console.print(render_status(st))
            if not args.watch:
                return 0
            time.sleep(args.watch)


def _cluster_status(args: argparse.Namespace, console: Any, run: dict[str, Any] | None) -> int:
    """Every node of a cluster run: asked of its node agent through Ray (``cluster/status.py``)."""
    from .cluster.status import cluster_stats, render_cluster

    while True:
        nodes = cluster_stats(run["address"] if run else args.cluster, run["agents"] if run else None)
        if args.json:
            print(json.dumps({"nodes": nodes}, default=str), flush=True)
        else:
            console.print(render_cluster(nodes))
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .plan import check_imports, source_warnings

    cfg = load_config(args.file, args.set)
    check_imports(cfg, args.file)
    for text in source_warnings(cfg):
        print(f"{args.file}: warning: {text}", file=sys.stderr)
    print(f"{args.file}: ok: {len(cfg.stages)} stage(s) "
          f"({', '.join(s.name for s in cfg.stages)}), arena {format_bytes(int(cfg.broker.capacity))}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .config import load_config
    from .doctor import render, run_checks

    cfg = load_config(args.file, args.set, check_host=False) if args.file else None
    checks = run_checks(cfg, args.require_gpu)
    Console().print(render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def preflight(cfg: Any, require_gpu: bool) -> None:
    """What ``run`` checks before starting anything; failures stop it with their fixes."""
    from .doctor import run_checks

    failed = [c for c in run_checks(cfg, require_gpu, cluster=False) if c.status == "fail"]
    if failed:
        raise BrokerError("preflight failed:\n" + "\n".join(
            f"  {c.name}: {c.detail}\n    fix: {c.fix}" for c in failed))


def cmd_keys(args: argparse.Namespace) -> int:
    import os
    import shutil

    import zmq.auth

    names = ("broker.key", "broker.key_secret", "client.key", "client.key_secret")
    existing = [n for n in names if os.path.exists(os.path.join(args.dir, n))]
    if existing and not args.force:
        raise BrokerError(f"{args.dir} already holds keys ({', '.join(existing)}); brokers and clients "
                          f"configured with them would stop matching: pass --force to replace them")
    os.makedirs(os.path.join(args.dir, "authorized"), mode=0o700, exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(args.dir, "broker")
    client_public, client_secret = zmq.auth.create_certificates(args.dir, "client")
    shutil.copy(client_public, os.path.join(args.dir, "authorized"))
    for path in (server_secret, client_secret):
        os.chmod(path, 0o600)
    print(f"broker:\n  curve:\n    server_secret: {server_secret}\n    authorized: "
          f"{os.path.join(args.dir, 'authorized')}\n    server_public: {server_public}\n"
          f"    client_secret: {client_secret}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from broker.rundir import base_dir, cleanup, list_rundirs

    for e in list_rundirs():
        if e.live:
            print(f"live   {e.path} (pid {e.info.get('pid', '?')}): kept")
    from .cluster.status import stale_run_files

    removed = cleanup(dry_run=args.dry_run)
    for e in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {e.path} (pid {e.info.get('pid', '?')})")
    runs = stale_run_files(args.dry_run)  # cluster runs whose driver is gone
    for path in runs:
        print(f"{'would remove' if args.dry_run else 'removed'} {path}")
    if not removed and not runs:
        print(f"nothing to remove in {base_dir()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from broker.logs import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_json, role=args.cmd)
    handler = globals()[f"cmd_{args.cmd}"]
    try:
        return int(handler(args))
    except BrokerError as e:
        print(f"shmbroker {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
