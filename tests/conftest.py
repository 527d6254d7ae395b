"""Shared fixtures: a private runtime directory, brokers and clients, and a leak check on every test.

The leak check fails a test that leaves behind

* a process descended from this test process (a broker, a ``multiprocessing``
  child, a worker): found by walking parent pids in ``/proc/*/stat``,
  zombies included (a child nobody reaped is a leak too);
* a runtime directory whose broker is gone (``rundir.list_rundirs`` says it
  is not live: its ``flock`` is free), or any runtime directory at all once
  every broker started by the test has stopped;
* a new ``/dev/shm`` entry of this project's (``shmbroker*``) or of a process of
  this test's tree (``torch_<pid>_...``): the arena is a memfd and must never need
  one. Entries of other programs on the machine are none of these tests' business.

The session's private runtime base directory (``/tmp/shmbroker-tests-*``) is
made once, by the pytest process; child processes that import this module
(a ``spawn`` child unpickling a test's function) reuse it through the
environment, and it is removed when the session ends.

Offending processes are killed and stale directories removed after the
failure is reported, so one leaking test does not fail the ones after it.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Before anything imports broker.rundir: every broker of this session lives
# under one private base directory that the leak check can inspect. Made by the
# pytest process only: a child that imports this module finds it in the environment.
_BASE_VAR = "SHMBROKER_TESTS_BASE"  # "<pid of the pytest process>:<directory>"
if _BASE_VAR not in os.environ:
    os.environ[_BASE_VAR] = f"{os.getpid()}:{tempfile.mkdtemp(prefix='shmbroker-tests-')}"
_OWNER, _, _base = os.environ[_BASE_VAR].partition(":")
_RUNTIME_BASE = Path(_base)
os.environ["SHMBROKER_RUNTIME_DIR"] = str(_RUNTIME_BASE)

from broker import Broker, Client  # noqa: E402
from broker.rundir import list_rundirs  # noqa: E402

CAPACITY = 64 * 2**20
LEAK_GRACE = 5.0  # seconds a finished test's children get to exit before it is called a leak


# -- helpers ------------------------------------------------------------------------------
def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.005) -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _helper_pids() -> set[int]:
    """Long-lived helpers multiprocessing starts once per session (not leaks)."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    helpers = [(multiprocessing.resource_tracker._resource_tracker, "_pid"),
               (multiprocessing.forkserver._forkserver, "_forkserver_pid")]
    return {pid for obj, attr in helpers if (pid := getattr(obj, attr, None))}


def descendants() -> dict[int, str]:
    """``{pid: state}`` of this process's descendants, zombies included."""
    parent, state = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        fields = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        parent[pid], state[pid] = int(fields[1]), fields[0]
    out, todo = {}, [os.getpid()]
    while todo:
        ppid = todo.pop()
        for pid, pp in parent.items():
            if pp == ppid and pid not in out:
                out[pid] = state[pid]
                todo.append(pid)
    for pid in _helper_pids():
        out.pop(pid, None)
    return out


def memfd_links(pid: int | str = "self") -> list[str]:
    """The ``memfd:shmbroker-*`` descriptors open in process ``pid``."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "memfd:shmbroker-" in link:
            found.append(link)
    return found


def dev_shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


_PID_NAME = re.compile(r"^[A-Za-z]+_(\d+)_")  # torch_<pid>_<n>: torch's shared-memory files


def ours_in_dev_shm(tree: set[int]) -> set[str]:
    """The ``/dev/shm`` entries this project or a process of ``tree`` (pids) made.

    Anything else there belongs to other programs on the machine (a benchmark with
    torch.multiprocessing, multiprocessing's ``sem.*`` of any process): not ours to judge.
    """
    out = set()
    for name in dev_shm():
        m = _PID_NAME.match(name)
        if name.startswith("shmbroker") or (m is not None and int(m.group(1)) in tree):
            out.add(name)
    return out


def our_tree() -> set[int]:
    """This process and its descendants."""
    return {os.getpid(), *descendants()}


def _reap(pids: set[int], timeout: float) -> dict[int, str]:
    """Wait up to ``timeout`` for ``pids`` to exit and be reaped; return those still there."""
    deadline = time.monotonic() + timeout
    while True:
        multiprocessing.active_children()  # joins (reaps) finished multiprocessing children
        left = {p: s for p, s in descendants().items() if p in pids}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


# -- the leak check ----------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    before_children = set(descendants())
    tree = our_tree()
    before_shm = ours_in_dev_shm(tree)
    yield
    problems = []
    tree |= our_tree()  # the test's processes still there (one that came and went is not seen)
    leaked = _reap(set(descendants()) - before_children, LEAK_GRACE)
    if leaked:
        desc = ", ".join(f"pid {p} ({'zombie, never reaped' if s == 'Z' else 'state ' + s}: "
                         f"{_cmdline(p)})" for p, s in leaked.items())
        problems.append(f"child processes left behind: {desc}")
        for pid in leaked:  # only the ones this test started, by pid
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    live_children = set(descendants())
    for entry in list_rundirs(_RUNTIME_BASE):
        owner = entry.path.name.split("-", 1)[0]
        if not entry.live:
            problems.append(f"runtime directory of a dead broker left behind: {entry.path}")
        elif not owner.isdigit() or int(owner) not in live_children:
            problems.append(f"runtime directory of a broker that is not ours: {entry.path}")
        else:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
    shm = ours_in_dev_shm(tree) - before_shm
    if shm:
        problems.append(f"/dev/shm entries created: {sorted(shm)}")
    if problems:
        pytest.fail(f"{request.node.nodeid} leaked:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def runtime_base() -> Iterator[Path]:
    """The session's runtime base directory; it must be empty when the session ends (and is
    removed then, by the process that made it)."""
    yield _RUNTIME_BASE
    left = sorted(p.name for p in _RUNTIME_BASE.iterdir()) if _RUNTIME_BASE.is_dir() else []
    if str(os.getpid()) == _OWNER:
        shutil.rmtree(_RUNTIME_BASE, ignore_errors=True)
    assert not left, f"runtime directories left behind at the end of the session: {left}"


# -- brokers and clients -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """One 64 MiB broker shared by a module's tests (tests release what they allocate)."""
    with Broker(capacity=CAPACITY) as b:
        yield b


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    """A 64 MiB broker of this test's own, for tests that fill, count or kill it."""
    with Broker(capacity=CAPACITY) as b:
        yield b


@pytest.fixture
def client(broker: Broker) -> Iterator[Client]:
    with Client(broker.endpoint, timeout=20.0) as c:
        yield c


@pytest.fixture
def poll() -> Callable[..., object]:
    """``poll(condition, timeout=10, what="...")``: wait for a condition with a deadline."""
    return wait_for
