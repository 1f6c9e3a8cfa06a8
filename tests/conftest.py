import importlib
import os
from pathlib import Path

import pytest
import torch

# Tests never touch the user's cache; each run gets its own SIEVE_HOME unless one is given.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def bench_module(monkeypatch):
    """bench_module("decode") imports bench/decode.py as a module, with bench/ on sys.path for this test only."""
    def load(name: str):
        monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
        return importlib.import_module(name)
    return load
