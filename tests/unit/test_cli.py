"""The `sieve` CLI on a tiny GGUF, through a real subprocess (entry point, env settings, exit codes)."""

import json
import os
import re
import subprocess
import sys

import pytest

from .tiny_files import write_tiny_gguf


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "sieve.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_tiny_gguf(path)
    return {"SIEVE_BACKBONE": str(path), "SIEVE_HOME": str(tmp_path_factory.mktemp("home")), "COLUMNS": "200"}


def test_info_converts_once_then_loads_from_cache(tiny_env):
    first = run_cli("info", "--json", env=tiny_env)
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    assert a["loaded_from"] == "source (converted now)" and a["parameters"] > 0 and a["device"] == "cpu"
    second = json.loads(run_cli("info", "--json", env=tiny_env).stdout)
    assert second["loaded_from"] == "cache" and second["cache"] == a["cache"]
    assert second["first_start_convert_s"] == a["first_start_convert_s"]
    assert second["this_load_s"] < a["this_load_s"]
    table = run_cli("info", env=tiny_env)
    assert "first start (GGUF conversion)" in table.stdout and "this start" in table.stdout


def test_generate_streams_and_reports(tiny_env):
    out = run_cli("generate", "hello", "--max-new-tokens", "5", "--no-chat", env=tiny_env)
    assert out.returncode == 0, out.stderr
    assert "generated" in out.stderr and "tokens/s" in out.stderr
    quick = run_cli("generate", "hello", "--max-new-tokens", "5", "--no-chat", "--quant", "int8", "--attention",
                    "sparse", env=tiny_env)
    assert quick.returncode == 0 and "generated" in quick.stderr, quick.stderr
    info = json.loads(run_cli("info", "--json", "--quant", "int8", env=tiny_env).stdout)
    assert info["quantization"]["scheme"] == "int8" and "sparse" in info["attention_modes"]
    long_prompt = " ".join(f"word{i}" for i in range(25))  # ~160 tokens: over two 64-token blocks of queries
    forced = run_cli("generate", long_prompt, "--max-new-tokens", "2", "--no-chat", "--attention", "sparse",
                     "--sparse-min-length", "0", env=tiny_env)
    assert forced.returncode == 0, forced.stderr
    used = re.search(r"sparse prefill: (\d+) of (\d+) attention calls", forced.stderr)
    assert used and int(used[1]) == int(used[2]) > 0
    default = run_cli("generate", long_prompt, "--max-new-tokens", "2", "--no-chat", "--attention", "sparse",
                      env=tiny_env)  # under the 64K default: dense
    assert re.search(r"sparse prefill: 0 of [1-9]\d* attention calls", default.stderr), default.stderr
    bad = run_cli("generate", "hello", "--quant", "int3", env=tiny_env)
    assert bad.returncode == 1 and "int8 or int4" in bad.stderr


def test_bad_inputs_give_one_clear_error(tiny_env, tmp_path):
    missing = tmp_path / "nope.gguf"
    out = run_cli("info", env={**tiny_env, "SIEVE_BACKBONE": str(missing)})
    assert out.returncode == 1 and str(missing) in out.stderr.replace("\n", "") and "Traceback" not in out.stderr
    out = run_cli("generate", "  ", env=tiny_env)
    assert out.returncode == 1 and "empty" in out.stderr


def test_db_upgrade_then_current(tmp_path):
    env = {"SIEVE_HOME": str(tmp_path), "COLUMNS": "200"}
    before = run_cli("db", "current", env=env)
    assert before.returncode == 0 and "none" in before.stdout
    up = run_cli("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    assert (tmp_path / "sieve.db").is_file()
    after = run_cli("db", "current", env=env)
    assert "0003" in after.stdout and "none" not in after.stdout


@pytest.fixture(scope="module")
def tiny_embedder_dir(tmp_path_factory, tiny_env):
    from sieve.embedder.model_dir import EmbedderConfig

    folder = tmp_path_factory.mktemp("tiny-embedder")
    EmbedderConfig(backbone=tiny_env["SIEVE_BACKBONE"], max_length=64, query_instruction="Query: ").save(folder)
    return folder


def test_index_search_reindex_and_drop_through_the_cli(tiny_env, tiny_embedder_dir, tmp_path):
    env = {**tiny_env, "SIEVE_HOME": str(tmp_path / "home"), "SIEVE_CHUNK_TOKENS": "16", "SIEVE_CHUNK_OVERLAP": "4"}
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(["word"] * i + ["alpha beta gamma"] * 3)}
            for i in range(1, 9)]
    lines = [json.dumps(d) for d in docs]
    lines.insert(3, "{broken")
    corpus.write_text("\n".join(lines) + "\n")

    out = run_cli("index", "docs", str(corpus), env=env)
    assert out.returncode == 1 and "collection 'docs' does not exist" in out.stderr and "--create" in out.stderr
    out = run_cli("index", "docs", str(corpus), "--create", "--embedder", str(tiny_embedder_dir), "--inline",
                  env=env)
    assert out.returncode == 0, out.stderr
    assert "8 documents indexed or unchanged, 1 failed" in out.stderr and "corpus.jsonl:4" in out.stderr
    hits = json.loads(run_cli("search", "docs", docs[4]["title"], "-k", "3", "--json", env=env).stdout)
    assert len(hits) == 3 and all(set(h) >= {"external_id", "text", "score", "chunk_id"} for h in hits)
    listed = json.loads(run_cli("collections", "list", "--json", env=env).stdout)
    assert listed[0]["name"] == "docs" and listed[0]["indexed"] == 8 and listed[0]["chunks"] >= 8
    again = run_cli("index", "docs", str(corpus), "--inline", env=env)  # resumable: nothing left to do
    assert again.returncode == 0 and "8 documents indexed or unchanged" in again.stderr
    assert json.loads(run_cli("collections", "list", "--json", env=env).stdout) == listed
    assert run_cli("collections", "drop", "docs", "--yes", env=env).returncode == 0
    out = run_cli("search", "docs", "x", env=env)
    assert out.returncode == 1 and "does not exist" in out.stderr
