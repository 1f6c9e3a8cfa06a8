"""`sieve worker --concurrency 2` (Celery's prefork pool) on the embedded default: each child loads the
collection's embedder before it takes a task (within the alive timeout the app raises for it), and the two index a
job together to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sieve.store import make_engine, upgrade
from sieve.workers import jobs

from sieve.settings import Settings

pytestmark = pytest.mark.integration

MODEL = "all-minilm-l6-v2"
N_DOCS = 60


def _sieve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sieve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_prefork_children_preload_their_models_then_index(tmp_path: Path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(SIEVE_HOME=str(home), SIEVE_THREADS="1", SIEVE_DEVICE="cpu", SIEVE_REFRAG_BLOCKS="0",
               SIEVE_BATCH_DOCUMENTS="10", SIEVE_LOG_LEVEL="WARNING")
    home.mkdir()
    url = Settings(home=home).resolved_database_url()
    upgrade(url)
    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w") as f:
        for i in range(N_DOCS):
            f.write(json.dumps({"_id": f"d{i}", "text": f"document {i} about protein folding and cell {i % 7}"}) + "\n")
    assert _sieve("collections", "create", "pf", "--embedder", MODEL, env=env).returncode == 0
    submitted = _sieve("index", "pf", str(corpus), "--no-wait", env=env)
    assert submitted.returncode == 0, submitted.stderr
    (job_id,) = json.loads(submitted.stdout)["jobs"]

    log_path = tmp_path / "worker.log"
    engine = make_engine(url)
    with open(log_path, "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "sieve.cli", "worker", "--concurrency", "2"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240

            def children_ready() -> int:
                return log_path.read_text().count("sieve worker process ready")

            # one child may index all 60 documents while the other still loads: wait for both
            while not jobs.get_job(engine, job_id).finished or children_ready() < 2:
                assert worker.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    engine.dispose()
    info = jobs.get_job(make_engine(url), job_id)
    assert (info.status, info.done, info.failed) == ("done", N_DOCS, 0), info.errors[:3]
    text = log_path.read_text()
    assert "sieve worker ready" in text and "each process preloads its models" in text, text[-2000:]
    children = [line for line in text.splitlines() if line.startswith("sieve worker process ready")]
    assert len(children) == 2, text[-2000:]  # no child was ended mid-load and replaced
    assert all(f"preloaded {MODEL}" in line for line in children), children
    assert len({line.split("pid ")[1].split(";")[0] for line in children}) == 2
