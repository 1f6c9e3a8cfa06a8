"""sieve-client installs alone into a fresh venv (grpcio + protobuf, no torch, no numpy) and imports cleanly."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
OFFLINE_SIGNS = ("No matching distribution", "Could not find a version", "NewConnectionError",
                 "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeoutError")


def test_client_installs_alone_into_a_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT / "client")],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        if any(sign in done.stderr for sign in OFFLINE_SIGNS):
            pytest.skip(f"no package index reachable for grpcio/protobuf: {done.stderr.strip().splitlines()[-1]}")
        pytest.fail(done.stderr)
    code = ("import importlib.util as u, sieve_client as s; from sieve_client._proto import embed_pb2_grpc;"
            "print(s.SieveClient.__name__, s.AsyncSieveClient.__name__, u.find_spec('torch') is None,"
            " u.find_spec('numpy') is None, u.find_spec('sieve') is None)")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert out.split() == ["SieveClient", "AsyncSieveClient", "True", "True", "True"]
    names = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                           check=True).stdout.lower()
    installed = {line.split("==")[0] for line in names.split()}
    assert {"sieve-client", "grpcio", "protobuf"} <= installed
    assert not installed & {"torch", "numpy", "sieve"}, installed
    assert sys.version_info >= (3, 10)
