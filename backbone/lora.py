"""LoRA adapters in Sieve's file format (`<linear>.lora_A` / `<linear>.lora_B`, float32): taken from a peft-injected
model after training, and merged into the backbone's linears at load (W <- W + scale * B @ A), so inference runs
the plain model. The embedder, the reranker and REFRAG all ship adapters this way."""

from __future__ import annotations

import torch
import torch.nn as nn


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's `x.lora_A.default.weight` -> our `x.lora_A` (float32, contiguous, on the CPU)."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            base, kind = name.split(".lora_")[0], "lora_A" if ".lora_A." in name else "lora_B"
            out[f"{base}.{kind}"] = p.detach().float().contiguous().cpu()
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters peft injected into `model` (what a trainer optimises)."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LoRA parameters under peft's own names, for a resumable checkpoint
    (`model.load_state_dict(state, strict=False)` puts them back)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of `lora_state`: our `x.lora_A` tensors into peft's `x.lora_A.default.weight` parameters (the
    same r and targets, or a clear error)."""
    params = dict(model.named_parameters())
    wanted = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    names = {f"{key}.default.weight": key for key in state}
    if set(names) != wanted:
        raise ValueError(f"the adapter's {len(state)} LoRA tensors do not match this model's {len(wanted)} "
                         "(different targets or layers)")
    with torch.no_grad():
        for name, key in names.items():
            if params[name].shape != state[key].shape:
                raise ValueError(f"{key}: adapter {tuple(state[key].shape)} vs model {tuple(params[name].shape)} "
                                 "(a different LoRA r?)")
            params[name].copy_(state[key])


def merge_lora(model: nn.Module, adapter: dict[str, torch.Tensor], scale: float) -> int:
    """W <- W + scale * B @ A for every adapted linear, on the weight's device; returns how many were merged."""
    modules = dict(model.named_modules())
    merged = 0
    for key in adapter:
        if not key.endswith(".lora_A"):
            continue
        name = key.removesuffix(".lora_A")
        if name not in modules:
            raise KeyError(f"adapter targets {name!r}, which the backbone does not have")
        lin = modules[name]
        dev = lin.weight.device  # adapters load on the CPU; the backbone may live on a GPU
        a, b = adapter[key].to(dev, torch.float32), adapter[f"{name}.lora_B"].to(dev, torch.float32)
        new = lin.weight.detach().float() + scale * (b @ a)
        lin.weight = nn.Parameter(new.to(lin.weight.dtype), requires_grad=False)  # a new tensor: the cache is mmapped
        merged += 1
    return merged
