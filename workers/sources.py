"""Documents from files for `sieve index`: BEIR-style jsonl, plain .txt / .md files, or folders of them.

jsonl (or .jsonl.gz): one object per line with an id (`_id` or `id`), `text`, and optionally `title` (prepended to
the text, and kept in metadata) and `metadata` (an object). A line that is not such an object is reported with its
file and line number and the rest of the file is read on. A .txt / .md file is one document whose id is its path
relative to the folder given (or its name, for a file given directly).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jobs import DocumentIn

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text" if name.endswith(TEXT_SUFFIXES) else None


@dataclass
class Rejected:
    file: str
    line: int | None
    reason: str

    def as_error(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "reason": self.reason}
        if self.line is not None:
            out["line"] = self.line
        return out


def expand(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(file, root) for every indexable file under `paths` (folders are walked, sorted, hidden files skipped)."""
    out = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                if f.is_file() and _kind(f) and not any(p.startswith(".") for p in rel.parts):
                    out.append((f, path))
        elif path.is_file():
            out.append((path, path.parent))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return out


def read_jsonl(path: Path) -> Iterator[DocumentIn | Rejected]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Rejected(str(path), n, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield Rejected(str(path), n, f"expected a JSON object, got {type(obj).__name__}")
                continue
            doc_id = obj.get("_id", obj.get("id"))
            if doc_id is None or str(doc_id) == "":
                yield Rejected(str(path), n, "missing id: give `_id` or `id`")
                continue
            text, title = obj.get("text"), obj.get("title") or ""
            if text is not None and not isinstance(text, str) or not isinstance(title, str):
                yield Rejected(str(path), n, "`text` and `title` must be strings")
                continue
            metadata = obj.get("metadata") or {}
            if not isinstance(metadata, dict):
                yield Rejected(str(path), n, "`metadata` must be an object")
                continue
            if title:
                metadata = {**metadata, "title": title}
            body = f"{title}\n\n{text or ''}".strip() if title else (text or "")
            yield DocumentIn(str(doc_id), body, metadata)


def read_documents(paths: list[Path]) -> Iterator[DocumentIn | Rejected]:
    for path, root in expand(paths):
        if _kind(path) == "jsonl":
            yield from read_jsonl(path)
        else:
            rel = str(path.relative_to(root)) if path != root else path.name
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                yield Rejected(str(path), None, f"not UTF-8 text: {e.reason}")
                continue
            yield DocumentIn(rel, text, {"path": rel})
