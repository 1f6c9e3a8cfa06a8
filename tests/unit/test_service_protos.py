"""The committed stubs in client/sieve_client/_proto are what protos/generate.py makes from protos/sieve/v1 now."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "client" / "sieve_client" / "_proto"
# What the generator's version stamps into a stub, not what the .proto files say: grpcio-tools 1.85.4 writes
# GRPC_GENERATED_VERSION = '1.85.4' into the same code 1.85.1 stamped '1.85.1'. The committed, lower stamp stays
# valid (it is the oldest grpcio the stubs accept; test_stubs_import_cleanly_in_a_fresh_interpreter loads them).
_TOOL_STAMPS = (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE),
                re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
                re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)"))


def _without_tool_stamps(text: str) -> str:
    for stamp in _TOOL_STAMPS:
        text = stamp.sub("<stamp>", text)
    return text


def test_committed_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)], check=True,
                   capture_output=True, text=True)
    fresh = {p.name: _without_tool_stamps(p.read_text()) for p in tmp_path.iterdir()}
    committed = {p.name: _without_tool_stamps(p.read_text()) for p in COMMITTED.iterdir() if p.is_file()}
    assert len(fresh) > 20
    assert sorted(committed) == sorted(fresh), "stub files differ from the .proto files: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"


def test_tool_stamps_are_all_that_is_ignored():
    stub = (COMMITTED / "common_pb2_grpc.py").read_text()
    assert _without_tool_stamps(stub).count("<stamp>") == 1
    assert _without_tool_stamps(stub.replace("'1.85.1'", "'9.9.9'")) == _without_tool_stamps(stub)
    assert _without_tool_stamps(stub.replace("GRPC_VERSION = grpc", "GRPC_VERSION = 1 or grpc")) != \
        _without_tool_stamps(stub)
    pb2 = (COMMITTED / "common_pb2.py").read_text()
    assert _without_tool_stamps(pb2).count("<stamp>") == 2 and "sieve/v1/common.proto" in _without_tool_stamps(pb2)


def test_stubs_import_cleanly_in_a_fresh_interpreter():
    """No sys.path tricks: the stubs import each other as sieve_client._proto.*, with canonical proto names."""
    code = ("import sieve_client._proto.search_pb2_grpc as g, sieve_client._proto.search_pb2 as m;"
            "print(m.DESCRIPTOR.name, m.SearchRequest.__module__, m.SearchResponse.DESCRIPTOR.full_name)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/").stdout
    assert out.split() == ["sieve/v1/search.proto", "sieve_client._proto.search_pb2", "sieve.v1.SearchResponse"]


def test_enums_have_prefixed_zero_defaults():
    from sieve_client._proto import collections_pb2, common_pb2, documents_pb2

    for enum in (common_pb2.Pooling, common_pb2.Precision, collections_pb2.Metric, collections_pb2.IndexKind,
                 documents_pb2.JobStatus):
        zero = enum.Name(0)
        assert zero.endswith("_UNSPECIFIED")
        prefix = zero.removesuffix("UNSPECIFIED")
        assert all(name.startswith(prefix) for name in enum.keys())
