"""The CLI starts without torch: commands that talk to a server (`--remote`) pay for Python and grpc only, and the
model packages load their torch modules on first use of a name (PEP 562)."""

import importlib
import subprocess
import sys

import pytest


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, sieve.cli; print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["sieve.refrag", "sieve.reranker"])
def test_every_exported_name_resolves_lazily(package):
    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    assert set(mod.__all__) <= set(dir(mod))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mod.nope  # noqa: B018
    from sieve.refrag.model import Refrag
    from sieve.reranker.listwise import Reranker
    assert (mod.Refrag if package == "sieve.refrag" else mod.Reranker) is (
        Refrag if package == "sieve.refrag" else Reranker)
