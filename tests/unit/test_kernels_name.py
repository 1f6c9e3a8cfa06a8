"""The repo's `kernels/` folder (installed as sieve.kernels) must not hide the PyPI `kernels` package.

transformers >= 5.25 imports `from kernels import CUDAProperties` at start-up; run from the repo root
(`python -m pytest`, `python -m sieve.cli`) the folder came first on sys.path and every peft import failed.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import kernels, sieve.kernels
from peft import LoraConfig
import transformers.modeling_utils
print(kernels.__file__)
print(sieve.kernels.__file__)
print(hasattr(sieve.kernels, "block_sparse_attention"))
"""


def test_top_level_kernels_from_repo_root_is_the_installed_package():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI kernels package is not installed (transformers < 5.25)")
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    top, ours, has_kernel = out.stdout.split()
    assert Path(top).resolve() != (ROOT / "kernels" / "__init__.py").resolve()
    assert Path(ours).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert has_kernel == "True"
