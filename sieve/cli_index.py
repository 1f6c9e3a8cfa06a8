"""`sieve worker`, `sieve index`, `sieve search`, `sieve collections ...`: indexing and search on this machine's store.

These talk to the database, broker and index folder named by Settings directly (the embedded default needs nothing
running but a worker: `sieve worker`, or `sieve index --inline` to index in this process), or, with
`--remote ADDRESS` (SIEVE_REMOTE), to a Sieve server through the SDK (sieve/remote.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sieve.cli_common import cli_settings, console, err, fail
from sieve.remote import ApiKeyOption, RemoteOption, connect, local_only, remote_errors, remote_only
from sieve.settings import Settings

collections_app = typer.Typer(help="Collections in the local store: create, list, show, drop.", no_args_is_help=True)


def open_store(settings: Settings):
    """The store's engine. The embedded SQLite store is migrated on the spot; a server database must have been
    migrated with `sieve db upgrade` (migrations are never run implicitly against a shared database)."""
    from sieve.store import make_engine
    from sieve.store.migrate import current, head, upgrade

    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
        upgrade(url)
    elif current(url) != head():
        raise fail(f"the database at {url} is at migration {current(url)}, not {head()}: run `sieve db upgrade`")
    return make_engine(url)


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(index)
    app.command()(search)
    app.add_typer(collections_app, name="collections")


def worker(
    concurrency: Annotated[int, typer.Option(help="processes (1: run tasks in this process)")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Start a Celery worker: it claims indexing work from the jobs in SQL (broker: SIEVE_BROKER_URL, or the
    embedded SQLite broker under SIEVE_HOME)."""
    settings = cli_settings()
    open_store(settings).dispose()
    from sieve.workers.tasks import app as celery_app

    err.print(f"worker: database {settings.resolved_database_url()}, broker {settings.resolved_broker_url()}, "
              f"indexes {settings.index_path()}")
    pool = "solo" if concurrency == 1 else "prefork"
    celery_app.worker_main(["worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", f"--pool={pool}",
                            f"--hostname=sieve-{os.getpid()}@%h", "--without-gossip", "--without-mingle"])


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=err)


def index(
    collection: Annotated[str, typer.Argument(help="collection name")],
    files: Annotated[list[Path], typer.Argument(help="BEIR-style .jsonl files, .txt / .md files, or folders")],
    create: Annotated[bool, typer.Option("--create", help="create the collection if it does not exist")] = False,
    embedder: Annotated[str | None, typer.Option(help="embedder of a new collection (default SIEVE_EMBEDDER)")] = None,
    index_kind: Annotated[str, typer.Option(help="flat, hnsw or ivf-pq (a new collection)")] = "flat",
    inline: Annotated[bool, typer.Option("--inline", help="index in this process instead of by workers")] = False,
    wait: Annotated[bool, typer.Option(help="follow the jobs until they finish")] = True,
    submit_size: Annotated[int, typer.Option(help="documents per submitted job")] = 5000,
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Index FILES into COLLECTION with a progress bar. Re-running skips documents already indexed unchanged."""
    if remote:
        local_only(remote, inline=inline)
        return _index_remote(remote, api_key, collection, files, create, embedder, index_kind, wait, submit_size)
    from sieve.store.collections import get_collection
    from sieve.store.db import session_scope
    from sieve.store.errors import NotFound
    from sieve.workers import jobs, sources

    settings = cli_settings()
    engine = open_store(settings)
    try:
        with session_scope(engine) as s:
            get_collection(s, collection)
    except NotFound:
        if not create:
            raise fail(f"collection {collection!r} does not exist: create it with `sieve collections create "
                       f"{collection}`, or pass --create") from None
        _create(settings, engine, collection, embedder or settings.embedder, index_kind)
    try:
        paths = sources.expand(files)
    except FileNotFoundError as e:
        raise fail(str(e)) from None
    ctx = None
    if inline:
        from sieve.workers.pipeline import WorkerContext

        ctx = WorkerContext(engine=engine, index_root=settings.index_path(), model_home=settings.home / "cache",
                            chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
                            lease_s=settings.job_lease_s, device=settings.device, dtype=settings.dtype,
                            refrag_ks=settings.refrag_blocks, refrag_model=settings.refrag)
        enqueue = lambda job_id, n: None  # noqa: E731 -- drained below, in this process
    else:
        enqueue = None

    job_ids: list[int] = []
    buffer: list = []
    rejected: list[dict] = []

    def submit() -> None:
        if not buffer and not rejected:
            return
        info = jobs.submit_upsert(engine, collection, list(buffer), rejected=list(rejected),
                                  batch_documents=settings.batch_documents, fanout=settings.worker_fanout,
                                  enqueue=enqueue)
        job_ids.append(info.id)
        buffer.clear()
        rejected.clear()

    with err.status(f"reading {len(paths)} file(s) ..."):
        for item in sources.read_documents(files):
            if isinstance(item, sources.Rejected):
                rejected.append(item.as_error())
            else:
                buffer.append(item)
            if len(buffer) >= submit_size:
                submit()
        submit()
    if not job_ids:
        raise fail("no documents found in the files given")
    err.print(f"submitted job(s) {', '.join(map(str, job_ids))} to collection {collection!r}")
    if not (wait or inline):
        console.print_json(json.dumps({"jobs": job_ids}))
        return
    infos = _follow(engine, job_ids, ctx)
    _report(infos)
    if any(i.status == "failed" for i in infos):
        raise typer.Exit(code=1)


def _index_remote(remote: str, api_key: str | None, collection: str, files: list[Path], create: bool,
                  embedder: str | None, index_kind: str, wait: bool, submit_size: int) -> None:
    """`sieve index --remote`: read the files here, Upsert them in calls under the server's limits, follow the jobs
    with WatchJob."""
    from sieve_client import NotFound

    from sieve.workers import sources

    try:
        paths = sources.expand(files)
    except FileNotFoundError as e:
        raise fail(str(e)) from None
    with remote_errors(), connect(remote, api_key) as client:
        try:
            client.get_collection(collection)
        except NotFound:
            if not create:
                raise fail(f"collection {collection!r} does not exist on {remote}: create it with `sieve collections "
                           f"create {collection} --remote {remote}`, or pass --create") from None
            made = client.create_collection(collection, embedder=embedder, index_kind=index_kind)
            err.print(f"created collection {made.name!r} ({made.embedder}, {made.dim}-d, {made.index_kind})")
        limits = client.limits()
        per_call = max(1, min(submit_size, limits.get("max_documents_per_upsert") or submit_size))
        max_bytes = (limits.get("max_message_bytes") or 4 * 1024 * 1024) // 2
        job_ids: list[int] = []
        rejected: list[dict] = []
        buffer: list = []
        size = 0

        def submit() -> None:
            nonlocal size
            if buffer:
                job_ids.append(client.upsert(collection, buffer).id)
                buffer.clear()
                size = 0

        with err.status(f"reading {len(paths)} file(s) and sending them to {remote} ..."):
            for item in sources.read_documents(files):
                if isinstance(item, sources.Rejected):
                    rejected.append(item.as_error())
                    continue
                n = len(item.text.encode()) + len(json.dumps(item.metadata or {})) + len(item.external_id) + 16
                if buffer and (len(buffer) >= per_call or size + n > max_bytes):
                    submit()
                buffer.append((item.external_id, item.text, item.metadata or {}))
                size += n
            submit()
        if not job_ids:
            _report([], rejected)
            raise fail("no documents found in the files given")
        err.print(f"submitted job(s) {', '.join(map(str, job_ids))} to collection {collection!r} on {remote}")
        if not wait:
            console.print_json(json.dumps({"jobs": job_ids}))
            return
        finals = _watch(client, job_ids)
    _report([_JobView(j.done, j.failed, [{"external_id": e.document_id, "line": e.line, "reason": e.reason}
                                         for e in j.errors], j.status) for j in finals], rejected)
    if any(j.status == "failed" for j in finals):
        raise typer.Exit(code=1)


class _JobView:
    """A remote job in the shape `_report` reads (done, failed, errors as dicts, status)."""

    def __init__(self, done: int, failed: int, errors: list[dict], status: str):
        self.done, self.failed, self.errors, self.status = done, failed, errors, status


def _watch(client, job_ids: list[int]) -> list:
    """A progress bar over the jobs, fed by WatchJob (one job after the other; the jobs run in parallel on the
    server, so later ones are often finished by the time they are watched)."""
    jobs = {j: client.get_job(j) for j in job_ids}
    start = time.monotonic()
    with _progress() as bar:
        task = bar.add_task("indexing", total=sum(j.total for j in jobs.values()), rate="")

        def show() -> None:
            settled = sum(j.done + j.failed for j in jobs.values())
            elapsed = time.monotonic() - start
            bar.update(task, completed=settled, rate=f"{settled / elapsed:.1f} docs/s" if elapsed > 0 else "")

        for job_id in job_ids:
            for job in client.watch_job(job_id):
                jobs[job_id] = job
                show()
        show()
    return [jobs[j] for j in job_ids]


def _follow(engine, job_ids: list[int], ctx) -> list:
    from sieve.workers import jobs
    from sieve.workers.pipeline import drain

    total = sum(jobs.get_job(engine, j).total for j in job_ids)
    start = time.monotonic()
    with _progress() as bar:
        task = bar.add_task("indexing", total=total, rate="")
        while True:
            if ctx is not None:
                for j in job_ids:
                    drain(ctx, j)
            infos = [jobs.get_job(engine, j) for j in job_ids]
            settled = sum(i.done + i.failed for i in infos)
            elapsed = time.monotonic() - start
            bar.update(task, completed=settled, rate=f"{settled / elapsed:.1f} docs/s" if elapsed > 0 else "")
            if all(i.finished for i in infos):
                return infos
            time.sleep(0.25)


def _report(infos: list, rejected: list[dict] = ()) -> None:
    """rejected: documents refused while reading (remote indexing; locally they are in the jobs' errors)."""
    done = sum(i.done for i in infos)
    failed = sum(i.failed for i in infos) + len(rejected)
    errors = [*rejected, *(e for i in infos for e in i.errors)]
    err.print(f"[bold]{done}[/] documents indexed or unchanged, [bold]{failed}[/] failed")
    if errors:
        table = Table("where", "reason", title=f"{len(errors)} problem(s)" + (" (first 20)" if len(errors) > 20
                                                                              else ""))
        for e in errors[:20]:
            where = e.get("external_id") or f"{e.get('file', '')}:{e.get('line', '')}"
            table.add_row(str(where), e["reason"])
        err.print(table)


def search(
    collection: Annotated[str, typer.Argument(help="collection name")],
    query: Annotated[str, typer.Argument(help="what to look for")],
    k: Annotated[int, typer.Option("-k", help="results")] = 10,
    filter_: Annotated[list[str] | None, typer.Option("--filter", help="metadata key=value (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    rerank: Annotated[bool, typer.Option("--rerank", help="re-order the top candidates with the server's full-list "
                                                        "reranker (needs --remote)")] = False,
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Search COLLECTION in the local index (or on a server with --remote) and print the ranked chunks."""
    remote_only(remote, rerank=rerank)
    filters = {}
    for f in filter_ or []:
        key, sep, value = f.partition("=")
        if not sep:
            raise fail(f"--filter {f!r}: write key=value")
        try:
            filters[key] = json.loads(value)
        except json.JSONDecodeError:
            filters[key] = value
    if remote:
        with remote_errors(), connect(remote, api_key) as client:
            found = client.search(collection, query, k=k, filters=filters or None, rerank=rerank)
        hits = [_RemoteHit(h.chunk_id, h.document_id, h.text, h.score, h.metadata, h.ordinal, h.vector_score)
                for h in found]
        return _print_hits(collection, query, hits, as_json)
    from sieve.embedder import load_embedder
    from sieve.registry import resolve_embedder
    from sieve.store.collections import get_collection
    from sieve.store.db import session_scope
    from sieve.store.errors import InvalidInput, NotFound
    from sieve.store.search import Searcher

    settings = cli_settings()
    engine = open_store(settings)
    try:
        with session_scope(engine) as s:
            coll = get_collection(s, collection)
            embedder_name, dim = coll.embedder, coll.dim
        emb = load_embedder(resolve_embedder(embedder_name), home=settings.home / "cache", device=settings.device,
                            dtype=settings.dtype)
        vector = emb.encode_queries([query], dim=min(dim, emb.dim))[0]
        hits = Searcher(engine, settings.index_path()).search(collection, vector, k, filters)
    except (NotFound, InvalidInput, FileNotFoundError) as e:
        raise fail(str(e)) from None
    _print_hits(collection, query, hits, as_json)


class _RemoteHit:
    """A hit from the server, with the fields (and JSON keys) of a local `sieve.store.search.Hit`; `vector_score`
    (the index's similarity) too when the server reranked."""

    def __init__(self, chunk_id, external_id, text, score, metadata, ordinal, vector_score):
        self.chunk_id, self.external_id, self.text, self.score = chunk_id, external_id, text, score
        self.metadata, self.ordinal = metadata, ordinal
        if vector_score is not None and vector_score != score:
            self.vector_score = vector_score


def _print_hits(collection: str, query: str, hits: list, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps([h.__dict__ for h in hits]))
        return
    table = Table("#", "score", "document", "chunk", "text", title=f"{collection}: {query}")
    for rank, h in enumerate(hits, start=1):
        snippet = h.text if len(h.text) <= 160 else h.text[:157] + "..."
        table.add_row(str(rank), f"{h.score:.4f}", h.external_id, str(h.ordinal), snippet)
    console.print(table)


def _create(settings: Settings, engine, name: str, embedder: str, index_kind: str, metric: str = "ip"):
    from sieve.embedder import load_embedder
    from sieve.registry import resolve_embedder
    from sieve.store.collections import create_collection
    from sieve.store.db import session_scope

    try:
        with err.status(f"loading {embedder} to learn its dimension ..."):
            emb = load_embedder(resolve_embedder(embedder), home=settings.home / "cache", device=settings.device,
                                dtype=settings.dtype)
        with session_scope(engine) as s:
            create_collection(s, name, embedder=embedder, dim=emb.dim, metric=metric, index_kind=index_kind)
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    err.print(f"created collection {name!r} ({embedder}, {emb.dim}-d, {index_kind})")


@collections_app.command("create")
def collections_create(
    name: Annotated[str, typer.Argument(help="collection name: letters, digits, '.', '_', '-'")],
    embedder: Annotated[str | None, typer.Option(help="sieve-embed, all-minilm-l6-v2 or a model folder")] = None,
    index_kind: Annotated[str, typer.Option(help="flat, hnsw or ivf-pq")] = "flat",
    metric: Annotated[str, typer.Option(help="ip or l2")] = "ip",
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Create a collection."""
    if remote:
        with remote_errors(), connect(remote, api_key) as client:
            made = client.create_collection(name, embedder=embedder, index_kind=index_kind, metric=metric)
        err.print(f"created collection {made.name!r} ({made.embedder}, {made.dim}-d, {made.index_kind}) on {remote}")
        return
    settings = cli_settings()
    _create(settings, open_store(settings), name, embedder or settings.embedder, index_kind, metric)


@collections_app.command("list")
def collections_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List collections with their document and chunk counts."""
    if remote:
        with remote_errors(), connect(remote, api_key) as client:
            rows = [{"name": c.name, "embedder": c.embedder, "dim": c.dim, "index": c.index_kind,
                     "documents": c.documents, **{k: c.documents_by_status.get(k, 0) for k in
                                                  ("pending", "indexed", "failed")}, "chunks": c.chunks}
                    for c in client.list_collections()]
    else:
        from sieve.store.collections import collection_stats, list_collections
        from sieve.store.db import session_scope

        settings = cli_settings()
        with session_scope(open_store(settings)) as s:
            rows = [{"name": c.name, "embedder": c.embedder, "dim": c.dim, "index": c.index_kind,
                     **collection_stats(s, c)} for c in list_collections(s)]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("name", "embedder", "dim", "index", "documents", "indexed", "failed", "chunks")
    for r in rows:
        table.add_row(r["name"], r["embedder"], str(r["dim"]), r["index"], str(r["documents"]), str(r["indexed"]),
                      str(r["failed"]), str(r["chunks"]))
    console.print(table)


@collections_app.command("drop")
def collections_drop(
    name: Annotated[str, typer.Argument(help="collection to delete, with its documents and index")],
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete a collection: documents, chunks, vectors, jobs and index files."""
    if not yes and sys.stdin.isatty() and not typer.confirm(
            f"drop collection {name!r} and everything in it{f' on {remote}' if remote else ''}?"):
        raise typer.Exit(code=1)
    if remote:
        with remote_errors(), connect(remote, api_key) as client:
            client.delete_collection(name)
        err.print(f"dropped collection {name!r} on {remote}")
        return
    from sieve.store.errors import NotFound
    from sieve.workers.jobs import drop_collection

    settings = cli_settings()
    try:
        drop_collection(open_store(settings), settings.index_path(), name)
    except NotFound as e:
        raise fail(str(e)) from None
    err.print(f"dropped collection {name!r}")
