"""Celery tasks (thin: the work is `pipeline.drain`) and the sweep that re-sends wake-ups lost with dead workers.

Messages carry only a job id. `drain_job` claims batches of that job from SQL until none is left, so a duplicate
message costs one query and a lost one is replaced by the sweep: at worker start and every `sweep_interval` seconds
it sends a wake-up for every unfinished job with a batch nobody holds (`jobs.stalled_jobs`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from celery import signals
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError, OperationalError

from sieve.settings import Settings

from . import jobs, pipeline
from .app import QUEUE, make_app

log = logging.getLogger(__name__)

app = make_app()

_ctx: pipeline.WorkerContext | None = None
_MAIN_PID = os.getpid()  # the `sieve worker` process (this module is imported before prefork children fork)
_ctx_lock = threading.Lock()


def context() -> pipeline.WorkerContext:
    """This process's worker context, built on first use (after a prefork child is forked, not before)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            from sieve.store.db import make_engine

            settings = Settings()
            if settings.threads:
                import torch

                torch.set_num_threads(settings.threads)
            _ctx = pipeline.WorkerContext(
                engine=make_engine(settings.resolved_database_url()), index_root=settings.index_path(),
                model_home=settings.home / "cache", chunk_tokens=settings.chunk_tokens,
                chunk_overlap=settings.chunk_overlap, lease_s=settings.job_lease_s, device=settings.device,
                dtype=settings.dtype, refrag_ks=settings.refrag_blocks,
                refrag_model=settings.refrag,
            )
        return _ctx


TRANSIENT = (OperationalError, DBAPIError, BrokerError, ConnectionError, TimeoutError)


@app.task(name="sieve.drain_job", bind=True, autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60,
          retry_jitter=True, max_retries=10)
def drain_job(self, job_id: int) -> int:
    return pipeline.drain(context(), int(job_id))


def enqueue(job_id: int, messages: int = 1) -> None:
    for _ in range(max(1, messages)):
        drain_job.apply_async((job_id,), queue=QUEUE)


def sweep(engine) -> list[int]:
    """Send one wake-up for each unfinished job with claimable work; returns those job ids."""
    stalled = jobs.stalled_jobs(engine)
    for job_id in stalled:
        enqueue(job_id, 1)
    if stalled:
        log.info("sweep: woke up jobs %s", stalled)
    return stalled


def _sweep_forever(interval: float, stop: threading.Event) -> None:
    engine = context().engine
    while True:
        try:
            sweep(engine)
        except Exception:  # a sweep must never take the worker down
            log.exception("sweep failed; trying again in %.0f s", interval)
        if stop.wait(interval):
            return


_stop = threading.Event()


def warm_up(settings: Settings) -> str:
    """`pipeline.warm` on this process's context -> what was loaded, for the ready line. A model that fails to load
    is logged, not fatal (the batches that need it fail with the reason)."""
    t0 = time.perf_counter()
    try:
        names = pipeline.warm(context(), settings.embedder)
    except Exception:
        log.exception("could not preload the worker's models; batches will load them when they need them")
        return "preloading failed, see the log"
    blocks = " and the REFRAG block encoder" if settings.refrag_blocks else ""
    return f"preloaded {', '.join(names)}{blocks} in {time.perf_counter() - t0:.1f} s"


@signals.worker_process_init.connect
def _on_child_start(**_kwargs) -> None:
    """A prefork child, just forked: a context of its own, then its models (within the alive timeout `make_app`
    raises for it), before it takes a task. The solo pool sends the same signal in the worker's own process, where
    `_on_ready` preloads."""
    global _ctx, _ctx_lock
    if os.getpid() == _MAIN_PID:
        return
    if _ctx is not None:  # forked from a parent that had built one (a child replaced later): not fork-safe
        _ctx.engine.dispose(close=False)  # leave the parent's connections open, and to the parent
    _ctx, _ctx_lock = None, threading.Lock()
    settings = Settings()
    if settings.worker_preload:
        print(f"sieve worker process ready (pid {os.getpid()}; {warm_up(settings)})", file=sys.stderr, flush=True)


@signals.worker_ready.connect
def _on_ready(sender=None, **_kwargs) -> None:
    """Preload the models (solo pool: tasks run in this process), say ready, start the sweep."""
    settings = Settings()
    interval = min(30.0, max(1.0, settings.job_lease_s / 4))
    solo = type(getattr(sender, "pool", None)).__module__ == "celery.concurrency.solo"
    if not settings.worker_preload:
        loaded = "models load in the first batch that needs them"
    elif solo:
        loaded = warm_up(settings)
    else:  # prefork: each child preloads after its fork (_on_child_start) and prints its own line
        loaded = "each process preloads its models"
    print(f"sieve worker ready (pid {os.getpid()}; {loaded})", file=sys.stderr, flush=True)
    threading.Thread(target=_sweep_forever, args=(interval, _stop), name="sieve-sweep", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_sweeper(**_kwargs) -> None:
    _stop.set()
