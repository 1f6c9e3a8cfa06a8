"""The one decoder every Sieve job runs on: model, weight loading, tokenizer, attention modes, generation."""

from .attention import ATTENTION_MODES, AttentionContext, register_attention_mode
from .config import PRESETS, ModelArgs
from .generate import generate, sample, stream
from .loader import Backbone, BackboneNotFound, build_model, load_backbone
from .model import ModelOutput, Transformer
from .swap import swap_linears
from .tokenizer import Tokenizer
from .weights import WeightsError

__all__ = [
    "ATTENTION_MODES", "AttentionContext", "Backbone", "BackboneNotFound", "ModelArgs", "ModelOutput", "PRESETS",
    "Tokenizer", "Transformer", "WeightsError", "build_model", "generate", "load_backbone", "register_attention_mode",
    "sample", "stream", "swap_linears",
]
