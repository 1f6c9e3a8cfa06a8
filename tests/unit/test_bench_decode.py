"""bench/decode.py's pure helpers and bench/llama_worker.py's job protocol (no model needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def decode(bench_module):
    return bench_module("decode")


def test_agreement_counts_exact_matches_and_common_prefixes(decode):
    ref = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    other = [[1, 2, 3], [4, 5, 0], [0, 8, 9]]
    exact, prefix = decode.agreement(ref, other)
    assert exact == pytest.approx(1 / 3)
    assert prefix == pytest.approx((3 + 2 + 0) / 3)
    assert decode.common_prefix(None, [1]) is None


def test_ratios_are_against_the_same_metric_and_setting(decode):
    rows = [{"system": s, "metric": "decode_tokens_per_s", "setting": "b1", "value": v}
            for s, v in (("sieve-int4", 60.0), ("llama.cpp", 30.0), ("hf-transformers", 20.0))]
    rows.append({"system": "sieve-int4", "metric": "decode_tokens_per_s", "setting": "b8", "value": 100.0})
    rows.append({"system": "sieve-int4", "metric": "greedy_exact_match", "setting": "b1", "value": 1.0})
    decode.add_ratios(rows)
    assert rows[0]["vs_llama_cpp"] == 2.0 and rows[0]["vs_hf_transformers"] == 3.0
    assert rows[1]["vs_hf_transformers"] == 1.5 and "vs_llama_cpp" not in rows[1]
    assert "vs_llama_cpp" not in rows[3] and "vs_llama_cpp" not in rows[4]


def test_llama_worker_reports_errors_as_json():
    worker = str(ROOT / "bench" / "llama_worker.py")
    one = subprocess.run([sys.executable, worker, json.dumps({"op": "nope"})], capture_output=True, text=True,
                         timeout=60)
    assert "error" in json.loads(one.stdout)
    served = subprocess.run([sys.executable, worker, "--serve"], input='{"op": "nope"}\n{"op": "x"}\n',
                            capture_output=True, text=True, timeout=60)
    assert [("error" in json.loads(line)) for line in served.stdout.splitlines()] == [True, True]
