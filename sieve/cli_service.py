"""`sieve serve` and `sieve keys ...`: the CLI of the gRPC service (mounted on the main app in sieve/cli.py).

    sieve serve [--host H] [--port P] [--no-worker] [--preload]
                                                       the server, plus one embedded Celery worker by default
    sieve keys create NAME --scope embed --scope search:docs
    sieve keys list
    sieve keys revoke ID

Keys are managed straight in the database (SIEVE_DATABASE_URL), like `sieve db upgrade`: it is an operator's
command, not a client's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sieve.settings import Settings

console = Console()
err = Console(stderr=True)
keys_app = typer.Typer(help="API keys of the gRPC service (stored hashed in the database).", no_args_is_help=True)
WORKER_COMMAND = [sys.executable, "-m", "sieve.cli", "worker"]
LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"


def _engine(settings: Settings, *, migrate_sqlite: bool = True):
    from sieve.store import make_engine, upgrade

    url = settings.resolved_database_url()
    if migrate_sqlite and url.startswith("sqlite"):
        upgrade(url)  # the embedded default: one command, nothing to set up (a real database: `sieve db upgrade`)
    return make_engine(url)


def _worker_available() -> bool:
    try:
        from sieve.cli import app
    except Exception:
        return False
    names = {c.name or (c.callback.__name__.replace("_", "-") if c.callback else "") for c in app.registered_commands}
    return "worker" in names


def _start_worker() -> subprocess.Popen | None:
    if not _worker_available():
        err.print("[yellow]no `sieve worker` command in this build: indexing jobs will wait for a worker[/]")
        return None
    return subprocess.Popen(WORKER_COMMAND, env=os.environ.copy())


def _stop_worker(worker: subprocess.Popen | None) -> None:
    if worker is None or worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)  # Celery's warm shutdown: finish the current task
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default SIEVE_GRPC_HOST, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default SIEVE_GRPC_PORT, 50051; 0: any free)")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Prometheus port (default SIEVE_METRICS_PORT, 9464; -1: off)")] = None,
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="run one embedded Celery worker")] = True,
    preload: Annotated[bool | None, typer.Option(
        "--preload/--lazy", help="load the reranker and REFRAG model at start instead of on the first Rerank / "
        "Answer call (default SIEVE_PRELOAD_MODELS, lazy)")] = None,
) -> None:
    """Serve the gRPC API (embed, collections, indexing, search, rerank, answer) with an embedded worker, until
    Ctrl-C."""
    from sieve.service import create_server, run
    from sieve.service.interceptors import RequestIdFilter

    settings = Settings()
    updates = {k: v for k, v in {"grpc_host": host, "grpc_port": port, "metrics_port": metrics_port,
                                 "preload_models": preload}.items() if v is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    engine = _engine(settings)
    child = _start_worker() if worker else None
    worker_line = f"pid {child.pid}" if child else "none (--no-worker)" if not worker else "unavailable"

    async def main() -> int:
        try:  # the grpc.aio server belongs to the loop it is made in: make it in this one
            server = create_server(settings, engine=engine)
        except (OSError, ValueError) as e:
            err.print(f"[bold red]error:[/] {e}")
            return 1
        auth_on = await server.keys.enabled()
        await run(server, on_start=lambda: _print_where(settings, server, worker_line, auth_on))

        return 0

    try:
        code = asyncio.run(main())
    finally:
        _stop_worker(child)
        engine.dispose()
    if code:
        raise typer.Exit(code)


def _print_where(settings: Settings, server, worker_line: str, auth_on: bool) -> None:
    auth = ("on (admin key set)" if settings.admin_key is not None else "on (API keys exist)" if auth_on else
            "OFF: no SIEVE_ADMIN_KEY and no key yet (fine on 127.0.0.1; `sieve keys create` turns it on)")
    table = Table(show_header=False, box=None, title="sieve serve")
    lazy = "loads on the first call that needs it; --preload to load at start"
    scheme = "grpcs" if server.tls else "grpc"
    for k, v in (("gRPC", f"{scheme}://{settings.grpc_host}:{server.port}"),
                 ("metrics", f"http://{settings.grpc_host}:{server.metrics_port}/metrics"
                  if server.metrics_port is not None else "off"),
                 ("default embedder", f"{settings.embedder} (loading; health turns SERVING when ready)"),
                 ("reranker", f"{settings.reranker} ({'loading now' if settings.preload_models else lazy})"),
                 ("answers", f"{settings.refrag} ({'loading now' if settings.preload_models else lazy})"),
                 ("database", settings.resolved_database_url()),
                 ("indexes", str(settings.index_path())),
                 ("broker", settings.resolved_broker_url()),
                 ("worker", worker_line),
                 ("auth", auth),
                 ("home", str(settings.home))):
        table.add_row(f"[bold]{k}[/]", v)
    console.print(table)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    scope: Annotated[list[str], typer.Option(
        "--scope", help="admin, embed, rerank, answer, search:NAME, index:NAME, manage:NAME (NAME may be *); "
        "repeatable")],
) -> None:
    """Create an API key and print it once (only its hash is stored). The first key turns auth on."""
    from sieve.service.auth import create_key

    try:
        info, raw = create_key(_engine(Settings()), name, scope)
    except ValueError as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    err.print(f"key {info.id} {info.name!r} with scopes {', '.join(info.scopes)}; it is shown only now:")
    console.print(raw, highlight=False)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (ids, names, scopes, revoked or not); never the keys themselves."""
    from sieve.service.auth import list_keys

    table = Table("id", "name", "scopes", "created", "revoked")
    for k in list_keys(_engine(Settings())):
        table.add_row(str(k.id), k.name, " ".join(k.scopes), f"{k.created_at:%Y-%m-%d %H:%M}",
                      f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="the key's id (see `sieve keys list`)")]) -> None:
    """Revoke a key: running servers refuse it within SIEVE_AUTH_CACHE_S seconds."""
    from sieve.service.auth import revoke_key

    try:
        info = revoke_key(_engine(Settings()), key_id)
    except LookupError as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    console.print(f"revoked key {info.id} {info.name!r}")


def register(app: typer.Typer) -> None:
    """Mount `serve` and `keys` on the main CLI."""
    app.command("serve")(serve)
    app.add_typer(keys_app, name="keys")
