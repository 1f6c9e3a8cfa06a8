"""bench/kernel_speed.py and bench/quant_cpu.py run on CPU (tiny sizes, reference paths) and write results files."""

import json
import runpy
import sys
from pathlib import Path

import pytest

import sieve.results

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script,argv,name", [
    ("kernel_speed.py", ["--lengths", "256", "--batches", "1,32", "--repeat", "1"], "kernels-cpu-smoke"),
    ("quant_cpu.py", ["--rows", "1,64", "--repeat", "1", "--shapes", "wo,w2"], "quant-cpu"),
])
def test_cpu_smoke_run_writes_results(monkeypatch, tmp_path, script, argv, name):
    monkeypatch.setattr(sieve.results, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / script), *argv])
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["device"].startswith("cpu") and payload["rows"]
    systems = {r["system"] for r in payload["rows"]}
    if script == "kernel_speed.py":
        assert {"dense-sdpa", "sparse", "torch-matmul", "int8", "int4"} <= systems
        sparse = next(r for r in payload["rows"] if r["system"] == "sparse")
        assert 0 < sparse["block_density"] <= 1 and sparse["max_abs_diff_vs_dense"] < 1.0
    else:
        assert {"fp32", "bf16", "int8-packed", "int4-packed"} <= systems
        assert all(r["us"] > 0 for r in payload["rows"])
