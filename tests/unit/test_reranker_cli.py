"""The `sieve rerank` command body on a tiny GGUF, mounted on a throwaway typer app (sieve/cli.py mounts it)."""

import json

import pytest
import typer
from sieve.backbone import ModelArgs
from sieve.reranker.cli import rerank
from sieve.reranker.model_dir import RerankerConfig
from typer.testing import CliRunner

from .tiny_files import write_tiny_gguf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rr-cli")
    args = ModelArgs.from_name("tiny")
    args.max_seq_len = 4096
    write_tiny_gguf(folder / "tiny.gguf", args)
    RerankerConfig(backbone=str(folder / "tiny.gguf")).save(folder)
    return folder


@pytest.fixture
def cli(monkeypatch, tmp_path):
    monkeypatch.setenv("SIEVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    app = typer.Typer()
    app.command("rerank")(rerank)
    app.command("other")(lambda: None)  # two commands: typer then expects the command name, as in sieve/cli.py
    return lambda *args, **kw: CliRunner().invoke(app, ["rerank", *args], **kw)


@pytest.mark.parametrize("mode", ["full", "first", "sliding"])
def test_rerank_prints_a_permutation(cli, model_dir, mode):
    out = cli("heart attack", "aspirin helps", "the eiffel tower", "", "aspirin and heart", "--model",
              str(model_dir), "--mode", mode, "--json")
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert sorted(r["index"] for r in got["ranking"]) == [0, 1, 2, 3] and got["mode"] == mode
    assert got["stats"]["prompt_tokens"] > 0


def test_rerank_defaults_come_from_the_model_folder_and_fuse_overrides(cli, model_dir, tmp_path):
    folder = tmp_path / "inline-model"
    folder.mkdir()
    RerankerConfig(backbone=str(model_dir / "tiny.gguf"), mode="inline", fuse=True).save(folder)
    args = ("heart attack", "aspirin helps", "the eiffel tower", "aspirin and heart", "--model", str(folder), "--json")
    default = json.loads(cli(*args).stdout)
    assert (default["mode"], default["fused"]) == ("inline", True)
    plain = json.loads(cli(*args, "--no-fuse", "--mode", "full").stdout)
    assert (plain["mode"], plain["fused"]) == ("full", False)


def test_rerank_reads_a_file_and_honours_top_k(cli, model_dir, tmp_path):
    f = tmp_path / "passages.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"passage {i}"}) for i in range(12)) + "\n")
    out = cli("q", "--file", str(f), "--top-k", "3", "--model", str(model_dir), "--json")
    assert out.exit_code == 0, out.output
    ranking = json.loads(out.stdout)["ranking"]
    assert len(ranking) == 3 and len({r["index"] for r in ranking}) == 3


def test_rerank_errors_are_one_clear_line(cli, model_dir):
    assert cli("q", "--model", str(model_dir)).exit_code == 1  # no passages
    bad = cli("q", "a", "--model", str(model_dir), "--mode", "pairwise")
    assert bad.exit_code == 1 and "unknown mode" in bad.output
    missing = cli("q", "a", "--model", "/no/such/reranker")
    assert missing.exit_code == 1 and "no reranker" in missing.output


def test_train_reranker_rejects_bad_sources_and_templates(monkeypatch, tmp_path):
    from sieve.reranker.cli import train_reranker

    monkeypatch.setenv("SIEVE_HOME", str(tmp_path / "home"))
    app = typer.Typer()
    app.command("reranker")(train_reranker)
    app.command("other")(lambda: None)

    def run(*args):
        return CliRunner().invoke(app, ["reranker", "--out", str(tmp_path / "out"), "--data", str(tmp_path), *args])

    for args, message in ((["--source", "msmarco"], "unknown source 'msmarco'"),
                          (["--source", "nq=lots"], "must be a number"),
                          (["--source", "scifact=1,nq=0"], "must be positive"),
                          (["--template", "fancy"], "unknown template 'fancy'")):
        got = run(*args)
        assert got.exit_code == 1 and message in got.output, (args, got.output)
    assert not (tmp_path / "out").exists()  # nothing was trained or written
