"""docs/design.md's module table names every module of the three layers."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_is_in_the_design_table() -> None:
    table = "\n".join(line for line in (ROOT / "docs" / "design.md").read_text().splitlines()
                      if line.startswith("| `"))
    missing = [f"{pkg}/{m.name}" for pkg in ("broker", "workers", "shmbroker")
               for m in sorted((ROOT / pkg).glob("*.py"))
               if m.name not in ("__init__.py", "__main__.py") and m.name not in table]
    assert missing == []
