"""The repo's `kernels/` folder (installed as sieve.kernels) must not hide the PyPI `kernels` package.

transformers >= 5.25 imports `from kernels import CUDAProperties` at start-up; run from the repo root
(`python -m pytest`, `python -m sieve.cli`) the folder came first on sys.path and every peft import failed.
The same holds for the benchmark scripts: `python bench/X.py` puts bench/ first on sys.path, so no file there may
be named like an installed top-level package (bench/kernels.py did, and every script loading a
sentence-transformer failed; it is bench/kernel_speed.py now).
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


def _needs_pypi_kernels() -> None:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI kernels package is not installed (transformers < 5.25)")


def test_top_level_kernels_from_repo_root_is_the_installed_package():
    _needs_pypi_kernels()
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    top, ours, has_kernel = out.stdout.split()
    assert Path(top).resolve() != (ROOT / "kernels" / "__init__.py").resolve()
    assert Path(ours).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert has_kernel == "True"


def test_no_bench_script_hides_an_installed_top_level_package():
    """What a bench script sees: bench/ first on sys.path. Every module it could shadow is checked by name, and
    the import that failed (transformers' hub kernels, reached by loading a sentence-transformer) is run there."""
    _needs_pypi_kernels()
    installed = {name for dist in importlib.metadata.distributions()
                 for name in (dist.read_text("top_level.txt") or "").split()}
    clashes = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem in installed | {"kernels"})
    assert not clashes, f"bench/ files named like installed packages: {clashes}"
    code = "import kernels; import transformers.integrations.hub_kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.split()[-1]).parent.name == "kernels"  # the package's kernels/__init__.py
