import os
import uuid

import pytest
import torch
from sieve.backbone import load_backbone
from sqlalchemy.engine import make_url

from sieve.registry import resolve_backbone


@pytest.fixture(scope="session")
def smollm2_path():
    return resolve_backbone("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def sieve_home(tmp_path_factory):
    return tmp_path_factory.mktemp("sieve-home")


@pytest.fixture(scope="session")
def smollm2(smollm2_path, sieve_home):
    """The real backbone, converted from the packaged GGUF once per test session."""
    return load_backbone(smollm2_path, home=sieve_home, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """HF transformers' own model, loaded from the same GGUF: the parity reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare a fixed number of tokens
    model.generation_config.pad_token_id = 2
    return model.eval()


POSTGRES = os.environ.get("SIEVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database `sieve_test_<random>` on the local server (trust auth), dropped after."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {POSTGRES}: {e}")
    name = f"sieve_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1)).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
