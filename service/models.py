"""The embedders a server holds: one `Embedder` per name, each loaded once, in a thread, on first need.

The default model (Settings.embedder) is loaded at start; until it is ready, calls that need it get UNAVAILABLE
(and health says NOT_SERVING). Other models load when first asked for, and the call waits for them. A name a
client sends must be a registered model or the default: a client cannot make the server open arbitrary paths.
Collections may name any embedder their (authorized) creator chose; those names are trusted when read back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from .errors import ModelLoading, invalid

log = logging.getLogger("sieve.service.models")


class ModelPool:
    def __init__(self, loader: Callable[[str], object], *, default: str, registered: Iterable[str] = ()):
        self.loader = loader
        self.default = default
        self.registered = {default, *registered}
        self._models: dict[str, object] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._errors: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings) -> ModelPool:
        from sieve.registry import EMBEDDERS

        def load(name: str):
            from sieve.embedder import load_embedder

            from sieve.registry import resolve_embedder

            return load_embedder(resolve_embedder(name), home=settings.home / "cache", device=settings.device,
                                 dtype=settings.dtype)

        return cls(load, default=settings.embedder, registered=EMBEDDERS)

    @classmethod
    def preloaded(cls, models: dict[str, object], *, default: str) -> ModelPool:
        """A pool of models already in memory (tests, benchmarks)."""
        pool = cls(lambda name: models[name], default=default, registered=models)
        pool._models.update(models)
        return pool

    @property
    def ready(self) -> bool:
        return self.default in self._models

    def loaded(self) -> dict[str, object]:
        return dict(self._models)

    def names(self) -> list[str]:
        return sorted(self.registered | set(self._models))

    async def load(self, name: str):
        if name in self._models:
            return self._models[name]
        if name not in self._loading:
            self._loading[name] = asyncio.ensure_future(self._load(name))
        return await asyncio.shield(self._loading[name])

    async def _load(self, name: str):
        try:
            log.info("loading embedder %s", name)
            model = await asyncio.to_thread(self.loader, name)
            self._models[name] = model
            self._errors.pop(name, None)
            log.info("embedder %s ready: dim %s", name, getattr(model, "dim", "?"))
            return model
        except Exception as e:
            self._errors[name] = f"{type(e).__name__}: {e}"
            log.exception("embedder %s failed to load", name)
            raise ModelLoading(f"model {name!r} failed to load ({e}); the server log has the details") from e
        finally:
            self._loading.pop(name, None)

    async def get(self, name: str, *, field: str = "model", trusted: bool = False):
        """The embedder called `name` ('' for the default), loading it if needed."""
        name = name or self.default
        if name in self._models:
            return self._models[name]
        if name == self.default:  # loading at start: say so rather than hold the call
            if name in self._errors:
                raise ModelLoading(f"model {name!r} failed to load: {self._errors[name]}")
            raise ModelLoading(f"model {name!r} is still loading; retry in a few seconds")
        if not trusted and name not in self.registered:
            raise invalid(field, f"unknown model {name!r}; this server serves {', '.join(self.names())}")
        return await self.load(name)
