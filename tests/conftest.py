import os

import pytest
import torch

# Tests never touch the user's cache; each run gets its own SIEVE_HOME unless one is given.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
