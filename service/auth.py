"""API keys: who may call what, on which collection.

A key is a random token (`sk-sieve-...`); only its sha256 (`sieve.store.hash_api_key`) is stored, in the
`api_keys` table, with a name and a list of scopes:

    admin              everything, including keys, creating and deleting any collection
    embed              Embed, EmbedStream, Tokenize
    rerank             Rerank
    search:NAME        Search (and Answer) on collection NAME; `search:*` on every collection
    index:NAME         Upsert, DeleteDocuments, and GetJob / WatchJob of that collection's jobs
    manage:NAME        CreateCollection / DeleteCollection of NAME
    answer             Answer over passages sent in the call

Any scope on a collection lets a key see it (GetCollection, and ListCollections lists only those). Info, health
and reflection need no key at all (Info says whether auth is on, and the limits a client splits its calls by).

Bootstrapping: `Settings.admin_key` (SIEVE_ADMIN_KEY) is a key with `admin`, never stored. Auth is OFF (every
call allowed) only while no admin key is configured AND the api_keys table is empty: the local embedded default,
`sieve serve` on 127.0.0.1 with nothing set up. Creating the first key (`sieve keys create`) turns auth on for
good, within `auth_cache_s` for a running server. Revoked keys count as created.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import grpc

from .errors import ServiceError

COLLECTION_ACTIONS = ("search", "index", "manage")
PLAIN_SCOPES = ("admin", "embed", "rerank", "answer")
SCOPE_RE = re.compile(r"^(?:admin|embed|rerank|answer"
                      r"|(?:search|index|manage):(?:\*|[A-Za-z0-9][A-Za-z0-9._-]{0,199}))$")
KEY_PREFIX = "sk-sieve-"


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, action: str, collection: str | None = None) -> bool:
        if self.admin:
            return True
        if collection is None:
            return action in self.scopes
        return f"{action}:{collection}" in self.scopes or f"{action}:*" in self.scopes

    def sees(self, collection: str) -> bool:
        return any(self.allows(a, collection) for a in COLLECTION_ACTIONS)


ANONYMOUS = Principal("anonymous (auth is off)", frozenset({"admin"}))
current: contextvars.ContextVar[Principal] = contextvars.ContextVar("sieve_principal", default=ANONYMOUS)


def require(action: str, collection: str | None = None) -> Principal:
    """The caller's principal, if it may do `action` (on `collection`); else PERMISSION_DENIED."""
    who = current.get()
    if not who.allows(action, collection):
        scope = action if collection is None else f"{action}:{collection}"
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                           f"API key {who.name!r} may not {action}" + (f" on collection {collection!r}" if collection
                                                                      else "") + f"; it needs scope {scope!r}")
    return who


def check_scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if not SCOPE_RE.match(s)]
    if bad:
        raise ValueError(f"invalid scope(s) {', '.join(map(repr, bad))}: use {', '.join(PLAIN_SCOPES)}, "
                         "search:NAME, index:NAME or manage:NAME (NAME may be *)")
    if not scopes:
        raise ValueError("a key needs at least one scope")
    return list(dict.fromkeys(scopes))


class KeyStore:
    """Looks keys up by hash, caching answers for `cache_s` seconds (None engine: only the admin key exists)."""

    def __init__(self, engine, *, admin_key: str | None = None, cache_s: float = 5.0):
        self.engine = engine
        self.admin_key = admin_key or None
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._enabled: tuple[float, bool] | None = None

    async def enabled(self) -> bool:
        if self.admin_key:
            return True
        if self.engine is None:
            return False
        now = time.monotonic()
        if self._enabled is None or now - self._enabled[0] > self.cache_s:
            self._enabled = (now, await asyncio.to_thread(_any_key, self.engine))
        return self._enabled[1]

    async def authenticate(self, raw: str | None) -> Principal:
        if not await self.enabled():
            return ANONYMOUS
        if not raw:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing API key: send metadata "
                               "'authorization: Bearer <key>' (or 'x-api-key: <key>')")
        if self.admin_key and hmac.compare_digest(raw.encode(), self.admin_key.encode()):
            return Principal("admin (SIEVE_ADMIN_KEY)", frozenset({"admin"}))
        principal = await self._lookup(raw)
        if principal is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key (unknown or revoked)")
        return principal

    async def _lookup(self, raw: str) -> Principal | None:
        from sieve.store import hash_api_key

        digest = hash_api_key(raw)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] <= self.cache_s:
            return hit[1]
        principal = None if self.engine is None else await asyncio.to_thread(_find_key, self.engine, digest)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, principal)
        return principal


def _any_key(engine) -> bool:
    from sieve.store import ApiKey, session_scope
    from sqlalchemy import select

    with session_scope(engine) as s:
        return s.scalar(select(ApiKey.id).limit(1)) is not None


def _find_key(engine, digest: str) -> Principal | None:
    from sieve.store import ApiKey, session_scope
    from sqlalchemy import select

    with session_scope(engine) as s:
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if key is None or key.revoked:
            return None
        return Principal(key.name, frozenset(key.scopes))


# -- key management (the `sieve keys` commands) ----------------------------------------------------------------


@dataclass
class KeyInfo:
    id: int
    name: str
    scopes: list[str]
    created_at: object
    revoked_at: object


def create_key(engine, name: str, scopes: list[str]) -> tuple[KeyInfo, str]:
    """A new key -> (its row, the raw key). The raw key is shown once and never stored."""
    from sieve.store import ApiKey, hash_api_key, session_scope

    scopes = check_scopes(scopes)
    if not name.strip():
        raise ValueError("a key needs a name")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    with session_scope(engine) as s:
        key = ApiKey(key_hash=hash_api_key(raw), name=name, scopes=scopes)
        s.add(key)
        s.flush()
        return _info(key), raw


def revoke_key(engine, key_id: int) -> KeyInfo:
    from sieve.store import ApiKey, session_scope
    from sieve.store.models import utcnow

    with session_scope(engine) as s:
        key = s.get(ApiKey, key_id)
        if key is None:
            raise LookupError(f"no API key with id {key_id}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
        return _info(key)


def list_keys(engine) -> list[KeyInfo]:
    from sieve.store import ApiKey, session_scope
    from sqlalchemy import select

    with session_scope(engine) as s:
        return [_info(k) for k in s.scalars(select(ApiKey).order_by(ApiKey.id))]


def _info(key) -> KeyInfo:
    return KeyInfo(key.id, key.name, list(key.scopes), key.created_at, key.revoked_at)
