"""Channels, call metadata, retry policy and health checks: shared by the sync and the async client."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call that failed with UNAVAILABLE or RESOURCE_EXHAUSTED: exponential backoff with full
    jitter, within the call's own timeout."""

    attempts: int = 5  # tries in all, the first included
    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (1-based)."""
        return random.uniform(0, min(self.max_s, self.initial_s * self.multiplier ** (attempt - 1)))


NO_RETRY = RetryPolicy(attempts=1)


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def channel_args(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def credentials(tls: bool, root_certificates, client_cert, client_key) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(root_certificates), private_key=_read(client_key),
                                        certificate_chain=_read(client_cert))


def call_metadata(api_key: str | None, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    md = []
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    if request_id:
        md.append(("x-request-id", request_id))
    return tuple(md)


def health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service}, encoded by hand: the SDK does not depend on grpcio-health."""
    raw = service.encode()
    return (b"\n" + _varint(len(raw)) + raw) if raw else b""


def health_status(response: bytes) -> str:
    # HealthCheckResponse{status = 1 (enum varint)}; an empty message is status 0
    return HEALTH_STATUS.get(response[1] if len(response) >= 2 and response[0] == 0x08 else 0, "UNKNOWN")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
