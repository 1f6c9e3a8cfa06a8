"""The gRPC server: `create_server(settings) -> (server, port)`, and `serve(settings)` to run one until a signal.

    server = create_server(settings)   # binds the port (0: any free one), nothing runs yet
    await server.start()               # gRPC + /metrics up, health NOT_SERVING, models loading in the background
    await server.wait_ready()          # the default embedder is loaded: health SERVING
    await server.stop()                # NOT_SERVING, no new calls, in-flight calls finish (grace), batcher drained

Services get their own health status: Info, Collection and Document are SERVING at once (they need the database
only), Embed and Search once the default embedder is loaded; Rerank and Answer are SERVING at once when their models
load on first use (the default), or once loaded with Settings.preload_models; the overall status ("") follows the
default embedder.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from sieve.backbone.loader import resolve_device
from sieve.embedder.batching import default_batch_tokens
from sieve_client._proto import (
    answer_pb2,
    answer_pb2_grpc,
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    embed_pb2,
    embed_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from .auth import KeyStore
from .batcher import Batcher, Runner, run_encoder
from .embed import EmbedServicer, InfoServicer
from .generation import AnswerServicer, Generators, RerankServicer
from .indexing import CollectionServicer, DocumentServicer, SearchServicer
from .interceptors import AuthInterceptor, MetricsInterceptor, RequestIdInterceptor
from .metrics import Metrics
from .models import ModelPool
from .state import ServerState

log = logging.getLogger("sieve.service")


def _name(module, service: str) -> str:
    return module.DESCRIPTOR.services_by_name[service].full_name


INFO = _name(info_pb2, "InfoService")
EMBED = _name(embed_pb2, "EmbedService")
COLLECTION = _name(collections_pb2, "CollectionService")
DOCUMENT = _name(documents_pb2, "DocumentService")
SEARCH = _name(search_pb2, "SearchService")
RERANK = _name(rerank_pb2, "RerankService")
ANSWER = _name(answer_pb2, "AnswerService")
SERVICES = (INFO, EMBED, COLLECTION, DOCUMENT, SEARCH, RERANK, ANSWER)
NEED_MODEL = (EMBED, SEARCH)
GENERATION = (RERANK, ANSWER)


@dataclass
class SieveServer:
    grpc_server: aio.Server
    port: int
    state: ServerState
    health: health_aio.HealthServicer
    keys: KeyStore
    address: str
    tls: bool
    metrics_port: int | None = None
    _loader: asyncio.Task | None = field(default=None, repr=False)
    _preloader: asyncio.Task | None = field(default=None, repr=False)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def start(self) -> None:
        s = self.state.settings
        self.state.batcher.start()
        await self.grpc_server.start()
        if s.metrics_port >= 0:
            self.metrics_port = self.state.metrics.serve(s.grpc_host, s.metrics_port)
        for name in SERVICES:
            ready = name not in NEED_MODEL and not (name in GENERATION and s.preload_models)
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if ready
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._loader = asyncio.ensure_future(self._load_default())
        if s.preload_models:
            self._preloader = asyncio.ensure_future(self._preload_generation())
        log.info("gRPC on %s:%d%s, metrics %s", s.grpc_host, self.port, " (TLS)" if self.tls else "",
                 f"on http://{s.grpc_host}:{self.metrics_port}/metrics" if self.metrics_port is not None else "off")

    async def _load_default(self) -> None:
        models = self.state.models
        if not models.ready:
            try:
                await models.load(models.default)
            except Exception:  # logged by the pool; health stays NOT_SERVING and calls say why
                return
        for name in NEED_MODEL:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def _preload_generation(self) -> None:
        gen = self.state.generation
        await gen.preload()
        for name, slot in ((RERANK, gen.rerank_slot), (ANSWER, gen.answer_slot)):
            if slot.model is not None:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is None:
            raise RuntimeError("start() the server first")
        await asyncio.wait_for(asyncio.shield(self._loader), timeout)
        return self.state.models.ready

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, refuse new calls, let in-flight calls finish within `grace` seconds,
        drain the batcher, stop metrics."""
        if self._stopped.is_set():
            return
        grace = self.state.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        for task in (self._loader, self._preloader):
            if task is not None:
                task.cancel()
        await self.state.batcher.close()
        self.state.generation.close()
        self.state.metrics.stop()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def create_server(settings, *, models: ModelPool | None = None, engine=None, index_root: Path | None = None,
                  runner: Runner = run_encoder, generation: Generators | None = None) -> SieveServer:
    """Build the server and bind its port; `models` defaults to the settings' embedders, `generation` to the
    settings' reranker and REFRAG model (loaded on first use), `engine` (the store) to none: a server without a
    database serves embeddings, Rerank and Answer over sent passages only (store RPCs answer UNIMPLEMENTED)."""
    metrics = Metrics()
    batch_tokens = settings.max_batch_tokens or default_batch_tokens(resolve_device(settings.device))
    batcher = Batcher(max_batch_tokens=batch_tokens, max_queued_texts=settings.max_queued_texts,
                      runner=runner, metrics=metrics)
    state = ServerState(settings=settings, models=models or ModelPool.from_settings(settings), batcher=batcher,
                        metrics=metrics, engine=engine,
                        index_root=index_root if index_root is not None else settings.index_path(),
                        generation=generation or Generators.from_settings(settings, metrics))
    if state.generation.metrics is None:
        state.generation.metrics = metrics
    admin = settings.admin_key.get_secret_value() if settings.admin_key is not None else None
    keys = KeyStore(engine, admin_key=admin, cache_s=settings.auth_cache_s)
    size = settings.max_message_bytes
    server = aio.server(
        interceptors=[RequestIdInterceptor(), MetricsInterceptor(metrics), AuthInterceptor(keys)],
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                 ("grpc.so_reuseport", 0)])
    info_pb2_grpc.add_InfoServiceServicer_to_server(InfoServicer(state, keys.enabled), server)
    embed_pb2_grpc.add_EmbedServiceServicer_to_server(EmbedServicer(state), server)
    collections_pb2_grpc.add_CollectionServiceServicer_to_server(CollectionServicer(state), server)
    documents_pb2_grpc.add_DocumentServiceServicer_to_server(DocumentServicer(state), server)
    search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(state), server)
    rerank_pb2_grpc.add_RerankServiceServicer_to_server(RerankServicer(state), server)
    answer_pb2_grpc.add_AnswerServiceServicer_to_server(AnswerServicer(state), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    tls = _credentials(settings)
    port = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC to {address}")
    return SieveServer(server, port, state, health, keys, address, tls is not None)


def _credentials(settings) -> grpc.ServerCredentials | None:
    cert, key = settings.tls_cert, settings.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both SIEVE_TLS_CERT and SIEVE_TLS_KEY")
    return grpc.ssl_server_credentials([(Path(key).expanduser().read_bytes(), Path(cert).expanduser().read_bytes())])


async def run(server: SieveServer, on_start=None) -> None:
    """Start `server` and run it until SIGINT / SIGTERM, then stop it gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if on_start is not None:
        on_start()
    await stop.wait()
    log.info("shutting down: finishing in-flight calls (up to %.0f s)", server.state.settings.shutdown_grace_s)
    await server.stop()
