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


@pytest.mark.parametrize(("package", "name", "module"), [("sieve.refrag", "Refrag", "sieve.refrag.model"),
                                                    ("sieve.reranker", "Reranker", "sieve.reranker.listwise")])
def test_every_exported_name_resolves_lazily(package, name, module):
    mod = importlib.import_module(package)
    for exported in mod.__all__:
        assert getattr(mod, exported) is not None, exported
    assert set(mod.__all__) <= set(dir(mod))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mod.nope  # noqa: B018
    assert getattr(mod, name) is getattr(importlib.import_module(module), name)
