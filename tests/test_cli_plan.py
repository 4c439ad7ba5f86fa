"""`study plan`: the plan checked against the data before anything else, and the power of every part."""

from __future__ import annotations

import json
from pathlib import Path

from studylib import cli

PARAMS = Path(__file__).resolve().parent.parent / "params"


def test_power_as_json_has_every_part_with_its_fields(tmp_path, capsys):
    assert cli.main(["plan", str(PARAMS / "demo.yaml"), "--runs", str(tmp_path), "--power", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    parts = {(r["finding"], r["part"]) for r in rows}
    assert {("a", "fewer labels"), ("b", "labels"), ("c", "hurts")} <= parts
    for r in rows:
        assert {"finding", "part", "n", "mde", "power", "seeds_needed"} <= set(r)
        assert r["n"] == 7 and 0 <= r["power"] <= 1 and r["mde"] > 0


def test_every_problem_of_a_plan_is_one_error_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = (PARAMS / "smoke.yaml").read_text()
    text = text.replace("pretrain_sizes: [0, 32]", "pretrain_sizes: [0, 5000]").replace(
        "finetune_sizes: [16]", "finetune_sizes: [16, 900]"
    )
    bad.write_text(text)
    assert cli.main(["plan", str(bad), "--runs", str(tmp_path / "runs")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(err) == 2 and all(ln.startswith("study: error: ") for ln in err)
    assert any("grid.pretrain_sizes" in ln and "5,000" in ln for ln in err), err
    assert any("grid.finetune_sizes" in ln and "900" in ln for ln in err), err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained
