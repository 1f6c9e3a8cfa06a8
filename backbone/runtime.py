"""Speed options applied to a loaded decoder: weight-only quantization, a compiled decode step, or (with neither)
float32 linears on oneDNN-prepacked weights.

One function shared by the CLI (`sieve generate --quant int4 --compile`) and the service (Settings.decode_quant,
Settings.compile_decode), so both run the same paths. Applying it again to the same model changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from .equalize import calibrated_rms, equalize
from .generate import compile_decode
from .model import Transformer
from .packed import is_packed, pack_linears
from .quant import SCHEMES, quantize


def apply_speed_options(model: Transformer, *, quant: str | None = None, compile: bool = False,
                        cache_dir: Path | None = None, on_compile=None, pack: bool = True,
                        calibration_dir: Path | None = None, equalize_int8: bool = True) -> Transformer:
    """quant: "int8" | "int4" | None / "none"; compile: attach a compiled decode step (`compile_decode`: on CPU
    AOTInductor libraries kept in `cache_dir`, e.g. SIEVE_HOME/cache/aot; on_compile(message) is told before a
    library is compiled); pack: with neither, run the float32 linears on oneDNN-prepacked weights on the CPU
    (`packed.pack_linears`; inference only). int8 first equalizes the channels (`equalize`: activation
    statistics from self-sampled text, cached in `calibration_dir`, e.g. SIEVE_HOME/cache/calibration) unless
    `equalize_int8` is False; int4 requantizes the weights as they are (exact for Q4_1 GGUF weights)."""
    if quant not in (None, "none"):
        if quant not in SCHEMES:
            raise ValueError(f"quantization {quant!r}: choose int8 or int4")
        done = getattr(model, "quant_scheme", None)
        if done is None and is_packed(model):
            raise ValueError(f"the decoder's linears are already packed for float32; load it again to quantize it "
                             f"to {quant}")
        if done is None:
            if quant == "int8" and equalize_int8:
                equalize(model, calibrated_rms(model, calibration_dir))
            quantize(model, quant)
        elif done != quant:
            raise ValueError(f"the decoder is already quantized to {done}; cannot requantize it to {quant}")
    if compile and getattr(model, "compiled_decode_step", None) is None:
        compile_decode(model, cache_dir=cache_dir, on_compile=on_compile)
    if pack and quant in (None, "none") and not compile:
        pack_linears(model)
    return model


def decode_path(model: Transformer) -> str:
    """What `sieve info` shows for decoding."""
    backend = getattr(model, "decode_backend", None) if getattr(model, "compiled_decode_step", None) else None
    how = {"aot": "AOTInductor-compiled static decode step (one library per batch and cache length, cached on "
                  "disk)",
           "inductor": "torch.compile'd static decode step (inductor, C++ wrapper)"}.get(backend,
                                                                                       "eager static decode step")
    weights = getattr(model, "quant_scheme", None) or ("float, oneDNN-packed" if is_packed(model) else "float")
    return how + f", weights {weights}"
