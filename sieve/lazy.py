"""Package names that load on first use (PEP 562): `import sieve.refrag` (and the CLI, which imports the packages'
commands) stays free of torch until a name that needs it is used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """-> (__getattr__, __dir__) for `package`, whose names live in the submodules `where` maps them to
    ({"Refrag": ".model"}). A name is imported once, then cached in the package's namespace."""

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
