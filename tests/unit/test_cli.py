"""The `sieve` CLI on a tiny GGUF, through a real subprocess (entry point, env settings, exit codes)."""

import json
import os
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
    assert "0002" in after.stdout and "none" not in after.stdout
