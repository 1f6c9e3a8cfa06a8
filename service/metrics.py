"""Prometheus metrics of one server, in a registry of its own (several servers can live in one test process).

    sieve_rpc_requests_total{method, code}           calls finished, by full method name and status code
    sieve_rpc_latency_seconds{method, code}          call latency (histogram)
    sieve_batch_texts                                texts per model forward (histogram)
    sieve_batch_requests                             calls merged into one model forward (histogram)
    sieve_batch_tokens_total                         tokens run through the model (rate() of it is tokens/s)
    sieve_batch_slots_total                          token positions the model computed, padding included
                                                     (tokens / slots: the share of the work that was not padding)
    sieve_tokens_per_second                          throughput of the last model forward
    sieve_queue_depth                                texts waiting for the model
    sieve_queue_rejected_total                       calls refused with RESOURCE_EXHAUSTED by the batcher
    sieve_expired_total                              texts dropped before the model: deadline passed or caller left
    sieve_generation_waiting{lane}                   Rerank / Answer calls waiting for a busy decoder
    sieve_generation_rejected_total{lane}            Rerank / Answer calls refused: too many already waiting
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rpc_requests = Counter("sieve_rpc_requests", "gRPC calls finished", ["method", "code"], registry=r)
        self.rpc_latency = Histogram("sieve_rpc_latency_seconds", "gRPC call latency", ["method", "code"],
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_texts = Histogram("sieve_batch_texts", "texts per model forward", buckets=_SIZE_BUCKETS,
                                     registry=r)
        self.batch_requests = Histogram("sieve_batch_requests", "calls merged into one model forward",
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Counter("sieve_batch_tokens", "tokens run through the model", registry=r)
        self.batch_slots = Counter("sieve_batch_slots", "token positions computed, padding included", registry=r)
        self.tokens_per_second = Gauge("sieve_tokens_per_second", "throughput of the last model forward", registry=r)
        self.queue_depth = Gauge("sieve_queue_depth", "texts waiting for the model", registry=r)
        self.queue_rejected = Counter("sieve_queue_rejected", "calls refused because the queue was full", registry=r)
        self.expired = Counter("sieve_expired", "texts dropped before the model (deadline or cancellation)",
                               registry=r)
        self.generation_waiting = Gauge("sieve_generation_waiting", "Rerank / Answer calls waiting for a busy decoder",
                                        ["lane"], registry=r)
        self.generation_rejected = Counter("sieve_generation_rejected", "Rerank / Answer calls refused because too "
                                           "many already waited for the decoder", ["lane"], registry=r)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the port it bound."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def text(self) -> str:
        return generate_latest(self.registry).decode()
