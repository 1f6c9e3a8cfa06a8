"""`--remote ADDRESS`: CLI commands talking to a Sieve server through the SDK instead of this machine's store and
models (`sieve embed`, `search`, `collections ...`, `index`, `rerank`, `answer`).

    sieve search docs "what binds quarks?" --remote 127.0.0.1:50051 --api-key sk-sieve-...
    SIEVE_REMOTE=grpcs://sieve.example.com:443 SIEVE_API_KEY=sk-sieve-... sieve collections list

ADDRESS is host:port (plaintext) or grpcs://host:port (TLS, trusting the system's roots, or the PEM file named by
SIEVE_REMOTE_CA). A failed call ends the command with one line: the status and the server's message (exit 1).
The commands import only the SDK on this path: no torch, no models, no database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from sieve.cli_common import fail

RemoteOption = Annotated[str | None, typer.Option(
    "--remote", envvar="SIEVE_REMOTE", metavar="ADDRESS",
    help="talk to the Sieve server at host:port (grpcs://host:port for TLS) instead of the local store/models")]
ApiKeyOption = Annotated[str | None, typer.Option(
    "--api-key", envvar="SIEVE_API_KEY", help="API key for --remote (sent as 'authorization: Bearer KEY')")]

TIMEOUT_S = 600.0  # per call: the first Rerank / Answer may wait for the server to load its model


def connect(address: str, api_key: str | None = None, *, timeout: float = TIMEOUT_S):
    """A `SieveClient` for ADDRESS (see the module docstring)."""
    from sieve_client import SieveClient

    tls = address.startswith("grpcs://")
    target = address.removeprefix("grpcs://").removeprefix("grpc://")
    if not target:
        raise fail("--remote: empty address; write host:port")
    roots = os.environ.get("SIEVE_REMOTE_CA") or None
    return SieveClient(target, api_key=api_key or None, tls=tls or roots is not None, root_certificates=roots,
                       timeout=timeout)


@contextmanager
def remote_errors() -> Iterator[None]:
    """SDK errors (and the SDK's own argument checks) -> one clear line and exit code 1."""
    from sieve_client import SieveError

    try:
        yield
    except SieveError as e:
        raise fail(str(e)) from None
    except (ValueError, TypeError) as e:
        raise fail(str(e)) from None


def local_only(remote: str | None, **options) -> None:
    """Fail if an option that only works locally was given together with --remote."""
    if remote:
        given = [name for name, value in options.items() if value]
        if given:
            raise fail(f"{', '.join('--' + g.replace('_', '-') for g in given)} works only locally, not with --remote")


def remote_only(remote: str | None, **options) -> None:
    """Fail if an option that needs a server was given without --remote."""
    if not remote:
        given = [name for name, value in options.items() if value]
        if given:
            raise fail(f"{', '.join('--' + g.replace('_', '-') for g in given)} needs --remote ADDRESS (a server)")
