"""Load a backbone (decoder + tokenizer) from a GGUF file or a HF safetensors folder, caching GGUF conversions.

A GGUF is dequantized once and written under `<home>/backbones/<name>-<key>/` as

    model.safetensors   float32 weights in this decoder's layout
    config.json         ModelArgs
    tokenizer.json, tokenizer_meta.json
    manifest.json       written last: format version, source identity, sizes, conversion time

into a temporary folder that is renamed into place, so a crash never leaves a half cache that looks whole.
A cache that fails to load (missing manifest, truncated or unreadable file, wrong keys or shapes) is
reported, removed and rebuilt. HF folders are read in place (their safetensors are already float weights).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelArgs
from .generate import stream
from .model import Transformer
from .tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_folder
from .weights import StateDict, WeightsError, read_gguf, read_hf_folder

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


class BackboneNotFound(FileNotFoundError):
    """No loadable model at the given path."""


class CacheCorrupt(RuntimeError):
    """A cached conversion exists but cannot be loaded."""


@dataclass
class Backbone:
    """A loaded decoder with its tokenizer, and where it came from."""

    model: Transformer
    tokenizer: Tokenizer
    source: Path
    cache_dir: Path | None
    load_seconds: float  # this load, end to end
    convert_seconds: float | None  # the one-time GGUF conversion that built the cache (None: not cached)
    converted_now: bool  # True when this load did the conversion (first start, or a rebuilt cache)
    cache_rebuilt_reason: str | None = None

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    def encode_prompt(self, text: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids for `text`, wrapped in the model's chat template (as one user turn) when `chat`: then `text`
        and `system` are read as text (a "<|im_end|>" in them stays characters) and only the template's markup
        gives control tokens. Without `chat` the caller writes the whole prompt, markup included: its special-token
        strings are control tokens."""
        if not (chat and self.tokenizer.meta.chat_template):
            return self.tokenizer.encode_template(text)
        user, sys_mark = "\x00SIEVE-USER\x00", "\x00SIEVE-SYSTEM\x00"
        messages = ([{"role": "system", "content": sys_mark}] if system else []) + [{"role": "user", "content": user}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode_template(rendered, {user: text, sys_mark: system or ""})

    def stream_ids(self, prompt_ids: list[int], **generation) -> Iterator[int]:
        """Generated token ids of one prompt as they are decoded, stopping at (and excluding) a stop token."""
        stop = set(self.tokenizer.eos_ids)
        for step in stream(self.model, [prompt_ids], stop_tokens=stop, pad_id=self.tokenizer.pad_id, **generation):
            token = int(step.tokens[0])
            if token in stop:
                return
            yield token

    def stream_text(self, text: str, *, chat: bool = True, system: str | None = None, **generation) -> Iterator[str]:
        """Text pieces of the answer to `text` as they are generated (see generate.stream for the options)."""
        ids = self.encode_prompt(text, chat=chat, system=system)
        yield from self.tokenizer.stream_decode(self.stream_ids(ids, **generation))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16") from None


def build_model(args: ModelArgs, state_dict: StateDict, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Construct on the meta device (no random init), assign the weights, then move and cast once."""
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    model.reset_rope()  # replace the meta buffer so .to() can move it
    model.to(device=device, dtype=dtype)
    model.reset_rope()  # .to(dtype) cast it; RoPE frequencies stay float32
    return model.eval().requires_grad_(False)


def cache_dir_for(source: Path, home: Path) -> Path:
    st = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()
    return home / "backbones" / f"{source.stem}-{key[:12]}"


@contextmanager
def _cache_lock(target: Path) -> Iterator[None]:
    """One converter of a cache folder at a time across processes (a server and its worker start together on a
    fresh machine): an exclusive `flock` on `<folder>.lock` beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f"{target.name}.lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_cache(source: Path, target: Path) -> float:
    t0 = time.perf_counter()
    from safetensors.torch import save_file

    args, sd = read_gguf(source)
    tokenizer = tokenizer_from_gguf(source)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(sd, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(args.to_dict(), indent=1))
    tokenizer.save(tmp)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": CACHE_FORMAT,
        "source": str(source.resolve()),
        "source_bytes": source.stat().st_size,
        "weights_bytes": (tmp / "model.safetensors").stat().st_size,
        "convert_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return seconds


def _read_cache(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, Tokenizer, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != CACHE_FORMAT:
            raise CacheCorrupt(f"cache format {manifest.get('format')} != {CACHE_FORMAT}")
        weights = folder / "model.safetensors"
        if weights.stat().st_size != manifest["weights_bytes"]:
            size, expected = weights.stat().st_size, manifest["weights_bytes"]
            raise CacheCorrupt(f"{weights} is {size} bytes, manifest says {expected}")
        args = ModelArgs.from_dict(json.loads((folder / "config.json").read_text()))
        state_dict = load_file(str(weights))
    except CacheCorrupt:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CacheCorrupt(f"{type(e).__name__}: {e}") from e
    try:
        tokenizer = Tokenizer.load(folder)
    except Exception as e:  # the tokenizers library raises plain Exception on a malformed file
        raise CacheCorrupt(f"tokenizer: {type(e).__name__}: {e}") from e
    try:
        model = build_model(args, state_dict, device, dtype)
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or wrong shapes
        raise CacheCorrupt(f"weights do not fit the config: {e}") from e
    return model, tokenizer, manifest


def use_shape_stable_attention() -> None:
    """Keep torch's cuDNN attention backend out of SDPA (flash, memory-efficient and math remain).

    cuDNN builds an execution plan for every new shape, and serving sees new shapes all the time (each prompt
    length, each speculative check). Measured on an H200 (torch 2.11, 30 calls = one forward's layers): the first
    call at a new shape took 74 ms (1.7K causal prefill), 79 ms (8K) and 524 ms (5 masked rows over 8K keys)
    against 1.4, 10.9 and 12.5 ms without cuDNN; a 100-passage full ranking 0.56 -> 0.33 s, the sliding window
    2.85 -> 1.22 s (bench/results/reranker-speed-cuda*.json). cuDNN is faster only at a shape it has seen.
    """
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("SDPA: cuDNN attention off (it plans per shape); flash / memory-efficient kernels serve")


def load_backbone(
    source: str | Path, *, home: str | Path, device: str = "auto", dtype: str = "auto"
) -> Backbone:
    t0 = time.perf_counter()
    source = Path(source).expanduser()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        use_shape_stable_attention()
    if not source.exists():
        raise BackboneNotFound(
            f"no model at {source}: expected a .gguf file or a folder with config.json and *.safetensors"
        )
    if source.is_dir():
        args, sd = read_hf_folder(source)
        model = build_model(args, sd, dev, dt)
        tokenizer = tokenizer_from_hf_folder(source, args.eos_token_ids)
        return Backbone(model, tokenizer, source, None, time.perf_counter() - t0, None, False)
    if source.suffix != ".gguf":
        raise WeightsError(f"{source}: not a .gguf file; point at a GGUF or a HF model folder")

    folder = cache_dir_for(source, Path(home).expanduser())
    converted_now, reason = False, None
    if not (folder / "manifest.json").exists():
        with _cache_lock(folder):
            if not (folder / "manifest.json").exists():  # another process may have written it while we waited
                _write_cache(source, folder)
                converted_now = True
    try:
        model, tokenizer, manifest = _read_cache(folder, dev, dt)
    except CacheCorrupt as e:
        reason = str(e)
        log.warning("backbone cache at %s is corrupt (%s); rebuilding it from %s", folder, reason, source)
        with _cache_lock(folder):
            _write_cache(source, folder)
        converted_now = True
        model, tokenizer, manifest = _read_cache(folder, dev, dt)
    return Backbone(
        model, tokenizer, source, folder, time.perf_counter() - t0, manifest["convert_seconds"], converted_now, reason
    )
