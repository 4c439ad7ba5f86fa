"""benchmarks/gpu_check.py on the CPU: every measurement runs with only torch, timm and the project, each is one
JSON line appended as it is taken, and a failing measurement is a line too while the others go on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_cpu_version_writes_one_line_per_measurement(gpu_check, tmp_path):
    out = tmp_path / "check.jsonl"
    only = "versions,single,deterministic,decode"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", only, "--out", str(out)]) == 0
    rows = _lines(out)
    assert [(r["name"], r.get("stage")) for r in rows] == [
        ("versions", None),
        ("single", "pretrain"),
        ("single", "segment"),
        ("deterministic", "segment"),
        ("decode", None),
    ]
    assert all(r["ok"] for r in rows), [r.get("error") for r in rows]
    single = rows[1]
    assert single["images_per_s"] > 0 and single["tflops"] > 0 and single["attention_kernels"]
    assert single["h2d_copies_per_step"] is None  # a CPU transfers nothing: not a made-up count
    assert rows[3]["equal_bits"] is True
    assert rows[4]["decoded"] == rows[4]["images"] == 8


def test_a_failing_measurement_is_a_line_and_the_rest_go_on(gpu_check, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("out of memory (made up)")

    monkeypatch.setattr(gpu_check, "measure_reference", broken)
    out = tmp_path / "check.jsonl"
    out.write_text(json.dumps({"name": "earlier"}) + "\n")  # appended to, never truncated
    gpu_check.main(["--device", "cpu", "--tiny", "--only", "versions,reference,decode", "--out", str(out)])
    rows = _lines(out)
    assert [r["name"] for r in rows] == ["earlier", "versions", "reference", "reference", "decode"]
    assert rows[2] == {**rows[2], "ok": False, "error": "RuntimeError: out of memory (made up)"}
    assert rows[-1]["ok"]


@pytest.mark.slow
def test_the_whole_cpu_check_runs(gpu_check, tmp_path):
    """Every measurement of `--device cpu`, at the tiny size (about a minute on a busy 2-core box)."""
    out = tmp_path / "check.jsonl"
    gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    rows = _lines(out)
    assert all(r["ok"] for r in rows), [r.get("error") for r in rows]
    assert {r["name"] for r in rows} == set(gpu_check.PLAN)
    assert [r["members"] for r in rows if r["name"] == "fused"] == [2, 2, 2, 2]
