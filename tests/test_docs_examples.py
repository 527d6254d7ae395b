"""Every Python example in README.md and docs/*.md runs as pasted into a file and run with
``python file.py`` (exit status 0).

Each ```python block is written to a file of its own and run in a scratch copy of the
repository root (``configs/`` linked in, so its relative paths are the README's; outputs such as
``out/demo/`` land in the scratch directory, not in the checkout), with the repository on
PYTHONPATH as an installed package would be. A block preceded by
``<!-- example: split-mode ... -->`` runs the way the docs say: with ``shmbroker broker`` and a
``shmbroker worker`` for ``configs/split.yaml`` running, the receiving program and the feeding
one side by side. A block that is deliberately not runnable is fenced ```python-norun; there
must be few.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--(?P<note>[^>]*)-->\s*\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.S | re.M)
SPLIT = "example: split-mode"


def blocks() -> list[tuple[str, str, str, str]]:
    """``(id, language, note, code)`` of every fenced block of the docs."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            out.append((f"{doc.relative_to(ROOT)}:{line}", m["lang"], (m["note"] or "").strip(), m["code"]))
    return out


PLAIN = [(bid, code) for bid, lang, note, code in blocks() if lang == "python" and SPLIT not in note]
SPLIT_BLOCKS = [code for _bid, lang, note, code in blocks() if lang == "python" and SPLIT in note]


def scratch_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "configs").symlink_to(ROOT / "configs")
    return root


def env(tmp_path: Path) -> dict[str, str]:
    rundir = tmp_path / "rundir"  # its own, so "the one broker running" is the one started here
    rundir.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "SHMBROKER_RUNTIME_DIR": str(rundir)}


def test_the_docs_have_examples_and_few_are_not_runnable() -> None:
    langs = [lang for _bid, lang, _note, _code in blocks()]
    assert len(PLAIN) >= 3 and len(SPLIT_BLOCKS) == 2
    assert langs.count("python-norun") <= 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("code", [code for _bid, code in PLAIN], ids=[bid for bid, _code in PLAIN])
def test_example_runs_as_pasted(tmp_path: Path, code: str) -> None:
    root = scratch_root(tmp_path)
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run([sys.executable, str(tmp_path / "example.py")], cwd=root, env=env(tmp_path),
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.timeout(300)
def test_split_mode_programs_run_around_a_running_broker(tmp_path: Path) -> None:
    root = scratch_root(tmp_path)
    e = env(tmp_path)
    feed, receive = tmp_path / "feed.py", tmp_path / "receive.py"
    feed.write_text(SPLIT_BLOCKS[0])
    receive.write_text(SPLIT_BLOCKS[1])
    cli = [sys.executable, "-m", "shmbroker"]
    broker = subprocess.Popen([*cli, "broker", "--config", "configs/split.yaml"], cwd=root, env=e,
                              stdout=subprocess.PIPE, text=True)
    started = [broker]
    try:
        assert broker.stdout is not None and "ready at" in broker.stdout.readline()
        started.append(subprocess.Popen([*cli, "worker", "--config", "configs/split.yaml", "--stage", "twice"],
                                        cwd=root, env=e))
        receiver = subprocess.Popen([sys.executable, str(receive)], cwd=root, env=e, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        started.append(receiver)
        fed = subprocess.run([sys.executable, str(feed)], cwd=root, env=e, capture_output=True, text=True,
                             timeout=120)
        assert fed.returncode == 0 and "fed 32 items" in fed.stdout, fed.stderr[-3000:]
        out, err = receiver.communicate(timeout=120)
        assert receiver.returncode == 0 and "received 32 results" in out, err[-3000:]
    finally:
        for p in reversed(started):
            if p.poll() is None:
                p.terminate()
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
