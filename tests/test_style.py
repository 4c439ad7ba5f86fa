"""One house style: ruff's linter and formatter, configured in pyproject.toml, are clean on the tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ["studylib", "tests", "tools", "notebooks"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *TREE], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    out = _ruff("check", "--output-format", "concise")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_clean():
    out = _ruff("format", "--check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_import_goes_up_a_wing():
    """core < data < study < analysis < views < cli: a module imports only its own wing or lower ones."""
    order = ["core", "data", "study", "analysis", "views"]
    bad = []
    for path in (ROOT / "studylib").rglob("*.py"):
        rel = path.relative_to(ROOT / "studylib").parts
        if len(rel) < 2 or rel[0] not in order:
            continue
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0] == "from" and words[1].startswith("studylib."):
                wing = words[1].split(".")[1]
                if wing in order and order.index(wing) > order.index(rel[0]):
                    bad.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not bad, "\n".join(bad)
