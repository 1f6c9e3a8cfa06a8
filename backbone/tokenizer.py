"""The backbone's tokenizer: a `tokenizers.Tokenizer` plus special ids and the chat template.

Built once from a GGUF (transformers' GGUF converter) or read from a HF folder's tokenizer.json, then
saved as `tokenizer.json` + `tokenizer_meta.json` beside the cached weights, so later starts need only the
fast `tokenizers` library. Incremental detokenization for streaming lives here too.

Special tokens ("<|im_start|>", "<|im_end|>", ...) are control tokens. `encode` reads text as text: a document,
passage, query or question that contains "<|im_end|>" gets the tokens of those characters, never the control token
(the `tokenizers` default would give the control token, so a document could end a chat turn or start a new one in
a prompt). Text Sieve writes itself (a rendered chat template) goes through `encode_template`, which reads the
template's special tokens as such and the values put into it as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers

META_FILE = "tokenizer_meta.json"
MAX_HELD = 4  # tokens held back for an unfinished UTF-8 character (a character is at most 4 bytes)


@dataclass
class TokenizerMeta:
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, meta: TokenizerMeta):
        self.tok = tok
        self.meta = meta
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids = set(specials.values())
        self._special_by_text = specials
        # longest first, so a special token that contains another is matched whole; () keeps them in split()
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")"
                                      ) if specials else None
        self._text = tokenizers.Tokenizer.from_str(tok.to_str())  # the same tokenizer, special-token strings as text
        self._text.encode_special_tokens = True

    @property
    def eos_ids(self) -> list[int]:
        return self.meta.eos_ids

    @property
    def pad_id(self) -> int:
        if self.meta.pad_id is not None:
            return self.meta.pad_id
        return self.meta.eos_ids[0] if self.meta.eos_ids else 0

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` read as text: special-token strings in it are characters, not control tokens."""
        return self._with_bos(self._text.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: list[str], *, add_bos: bool | None = None) -> list[list[int]]:
        return [self._with_bos(e.ids, add_bos) for e in self._text.encode_batch(texts, add_special_tokens=False)]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of each token `encode(text)` gives."""
        return list(self._text.encode(text, add_special_tokens=False).offsets)

    def encode_template(self, template: str, values: Mapping[str, str] | None = None, *,
                        add_bos: bool | None = None) -> list[int]:
        """Token ids of text Sieve wrote (a rendered chat template): its special-token strings are control tokens.
        Each key of `values` is a marker in `template`, replaced by its value read as text (`encode`), so what a
        user sent cannot become a control token. For values without special-token strings the ids equal those of
        the substituted text encoded in one go with its special tokens read as such (they split the text anyway)."""
        pieces = self._special_re.split(template) if self._special_re else [template]
        ids: list[int] = []
        for i, piece in enumerate(pieces):  # text, special, text, special, ..., text
            if i % 2:
                ids.append(self._special_by_text[piece])
                continue
            for marker, value in (values or {}).items():
                piece = piece.replace(marker, value)
            if piece:
                ids += self._text.encode(piece, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if (self.meta.add_bos if add_bos is None else add_bos) and self.meta.bos_id is not None:
            return [self.meta.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if not self.meta.chat_template:
            raise ValueError("this tokenizer has no chat template; pass raw text instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.meta.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.meta.bos_id), eos_token=self._token(self.eos_ids[0] if self.eos_ids else None),
        )

    def _token(self, i: int | None) -> str:
        return "" if i is None else (self.tok.id_to_token(i) or "")

    def stream_decode(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text pieces as ids arrive, holding back bytes of an unfinished UTF-8 character.

        Held-back tokens are released when the character completes, when more than `MAX_HELD` are pending (no UTF-8
        character takes more bytes: the bytes are invalid, so they come out as U+FFFD instead of waiting forever),
        and at the end of the stream, so the pieces always join to `decode(ids)`.
        """
        seen: list[int] = []
        prefix, read = 0, 0
        for i in ids:
            seen.append(i)
            before = self.decode(seen[prefix:read])
            now = self.decode(seen[prefix:])
            if len(now) > len(before) and (not now.endswith("\ufffd") or len(seen) - read > MAX_HELD):
                yield now[len(before):]
                prefix, read = read, len(seen)
        if read < len(seen):
            before, now = self.decode(seen[prefix:read]), self.decode(seen[prefix:])
            if len(now) > len(before):
                yield now[len(before):]

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, folder: Path) -> None:
        self.tok.save(str(folder / "tokenizer.json"))
        (folder / META_FILE).write_text(json.dumps(asdict(self.meta), indent=1))

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(tok, TokenizerMeta(**json.loads((folder / META_FILE).read_text())))


def tokenizer_from_gguf(path: Path) -> Tokenizer:
    """Build from the GGUF's vocabulary with transformers' converter (seconds; done once, then cached)."""
    from transformers import AutoTokenizer

    from .weights import gguf_metadata

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    meta = gguf_metadata(path)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return Tokenizer(
        hf.backend_tokenizer,
        TokenizerMeta(
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=[int(eos)] if eos is not None else [],
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        ),
    )


def tokenizer_from_hf_folder(path: Path, eos_ids: list[int]) -> Tokenizer:
    """Read tokenizer.json (+ tokenizer_config.json / chat_template.jinja) from a HF model folder."""
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

    def token_id(key: str) -> int | None:
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if value else None

    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    eos = token_id("eos_token")
    return Tokenizer(
        tok,
        TokenizerMeta(
            bos_id=token_id("bos_token"),
            eos_ids=sorted({*eos_ids, *([eos] if eos is not None else [])}),
            pad_id=token_id("pad_token"),
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=template if isinstance(template, str) else None,
        ),
    )
