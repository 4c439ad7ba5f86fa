"""What machine a run was made on: recorded in provenance.json (ISA, threads, CPU, torch, device), shown
under the results, and a warning when one table mixes machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import torch

from studylib.analysis.render import machine_note
from studylib.study import provenance


def test_machine_records_what_this_process_computes_with():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        m = provenance.machine("cpu")
    finally:
        torch.set_num_threads(before)
    assert m["threads"] == 1
    assert m["isa"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch"] == torch.__version__ and m["device"] == "cpu" and m["gpu"] is None and m["cpu"]
    assert provenance.describe(m).startswith(f"cpu, ISA {m['isa']}, 1 thread, ")


def test_an_isa_forced_from_the_environment_is_recorded():
    # AVX2 kernels give other numbers than AVX512 ones: a run made under the override must say so
    code = "import json; from studylib.study import provenance; print(json.dumps(provenance.machine('cpu')))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    assert m["isa"] == "DEFAULT" and m["threads"] == 1
    assert m["overrides"] == {"ATEN_CPU_CAPABILITY": "default"}
    assert "ATEN_CPU_CAPABILITY=default" in provenance.describe(m)


def _store(tmp_path, machines: list[dict | None]) -> pd.DataFrame:
    dirs = []
    for i, m in enumerate(machines):
        d = tmp_path / f"run{i}"
        d.mkdir()
        if m is not None:
            (d / "provenance.json").write_text(json.dumps({"machine": m}))
        dirs.append(str(d))
    return pd.DataFrame({"dir": dirs})


AVX512 = {"device": "cpu", "isa": "AVX512", "threads": 1, "cpu": "AMD EPYC", "torch": "2.14.1", "gpu": None}


def test_one_machine_is_named_under_the_tables(tmp_path):
    note = machine_note(_store(tmp_path, [AVX512, AVX512]))
    assert note == "runs made on: cpu, ISA AVX512, 1 thread, AMD EPYC, torch 2.14.1"


def test_a_table_that_mixes_machines_says_so(tmp_path):
    avx2 = {**AVX512, "isa": "AVX2"}
    note = machine_note(_store(tmp_path, [AVX512, avx2, AVX512, None]))
    assert note.startswith("warning: these runs were made on 3 machines")
    assert "2 runs on cpu, ISA AVX512" in note and "1 runs on cpu, ISA AVX2" in note
    assert "1 runs on unrecorded machine" in note


def test_a_table_that_mixes_recipes_says_so(tmp_path):
    df = _store(tmp_path, [AVX512, AVX512, AVX512]).assign(recipe=[2, 1, 2])
    note = machine_note(df)
    assert note.splitlines()[0].startswith("runs made on: ")
    assert "warning: these runs mix segmentation recipes (1 runs of recipe 1; 2 runs of recipe 2" in note
    assert "recipe" not in machine_note(df.assign(recipe=2))


def test_every_run_records_its_recipe_and_the_tables_read_it(smoke_store):
    from studylib.study.identity import RECIPES
    from studylib.study.store import RunFolder, collect

    for run in smoke_store.plan:
        assert RunFolder.of(run, smoke_store.runs).record["recipe"] == RECIPES[run.stage]
    df = collect(smoke_store.runs)
    assert len(df) == 4 and set(df.recipe) == {RECIPES["segment"]}
