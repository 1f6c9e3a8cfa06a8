"""The fast decode path on the real SmolLM2, through the CLI: int4 weights, compiled decode step.

Compiling costs 35-120 s on a 2-core CPU (once per shape; the library is kept under SIEVE_HOME), so one test pays it.
The session's SIEVE_HOME is shared with the other integration tests, so the GGUF is converted once for all of them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SIEVE = str(Path(sys.executable).parent / "sieve")
PROMPT = "Name three things a lighthouse keeper does every day."


def _run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SIEVE_HOME": str(home), "SIEVE_THREADS": "2"}
    return subprocess.run([SIEVE, *args], capture_output=True, text=True, env=env, timeout=900)


def test_compiled_int4_decode_streams_the_eager_paths_tokens(sieve_home):
    home = sieve_home
    eager = _run("generate", PROMPT, "--quant", "int4", "--max-new-tokens", "24", home=home)
    assert eager.returncode == 0, eager.stderr
    fast = _run("generate", PROMPT, "--quant", "int4", "--compile", "--max-new-tokens", "24", home=home)
    assert fast.returncode == 0, fast.stderr
    assert len(eager.stdout.strip()) > 20
    assert fast.stdout == eager.stdout  # the same greedy tokens, compiled or not
    assert "compiling the decode step" in fast.stderr
    packages = list((home / "cache" / "aot").glob("decode-b1-*.pt2"))
    assert len(packages) == 1
    # a later process loads the compiled library from SIEVE_HOME instead of compiling again
    again = _run("generate", PROMPT, "--quant", "int4", "--compile", "--max-new-tokens", "24", home=home)
    assert again.returncode == 0, again.stderr
    assert again.stdout == eager.stdout and "compiling the decode step" not in again.stderr
    assert list((home / "cache" / "aot").glob("decode-b1-*.pt2")) == packages


def test_info_shows_the_decode_path_and_heads(sieve_home):
    out = _run("info", "--json", "--quant", "int4", home=sieve_home)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    q = facts["quantization"]
    assert q["scheme"] == "int4" and q["lm_head"] == "int8" and q["decode_lm_head"] == "int4"
    assert q["lm_head_exact_topk"] == 8 and q["int4_group_size"] == [32]
    assert facts["decode"] == "eager static decode step, weights int4"
