"""Run the Triton kernels' tests (tests/kernels_interp) under TRITON_INTERPRET=1 in their own process.

The interpreter has to be chosen before `triton` is imported, which this process has already done.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_pass_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/kernels_interp", "-q", "-p", "no:cacheprovider", "-o", "addopts="],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=800,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 50, tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail
