"""Speed options applied to a loaded decoder: weight-only quantization and a compiled decode step.

One function shared by the CLI (`sieve generate --quant int4 --compile`) and the service (Settings.decode_quant,
Settings.compile_decode), so both run the same paths. Applying it again to the same model changes nothing.
"""

from __future__ import annotations

from .generate import compile_decode
from .model import Transformer
from .quant import SCHEMES, quantize


def apply_speed_options(model: Transformer, *, quant: str | None = None, compile: bool = False) -> Transformer:
    """quant: "int8" | "int4" | None / "none"; compile: attach a torch.compile'd decode step (`compile_decode`)."""
    if quant not in (None, "none"):
        if quant not in SCHEMES:
            raise ValueError(f"quantization {quant!r}: choose int8 or int4")
        done = getattr(model, "quant_scheme", None)
        if done is None:
            quantize(model, quant)
        elif done != quant:
            raise ValueError(f"the decoder is already quantized to {done}; cannot requantize it to {quant}")
    if compile and getattr(model, "compiled_decode_step", None) is None:
        compile_decode(model)
    return model


def decode_path(model: Transformer) -> str:
    """What `sieve info` shows for decoding."""
    compiled = getattr(model, "compiled_decode_step", None) is not None
    return ("torch.compile'd static decode step (inductor, C++ wrapper)" if compiled
            else "eager static decode step") + f", weights {getattr(model, 'quant_scheme', None) or 'float'}"
