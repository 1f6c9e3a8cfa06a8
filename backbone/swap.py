"""The one place where the decoder's modules are replaced (quantized linears, LoRA-merged layers, ...).

`swap_linears(model, make)` walks the module tree and replaces every `nn.Linear` for which
`make(qualified_name, linear)` returns a module; returning None keeps the original. Tied weights stay tied
only if `make` keeps them (the output head is a Linear like any other: skip it by name to keep it tied).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

LinearFactory = Callable[[str, nn.Linear], nn.Module | None]


def swap_linears(model: nn.Module, make: LinearFactory) -> list[str]:
    """Replace linears in place; returns the qualified names that were swapped."""
    swapped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = make(name, child)
            if new is not None:
                setattr(parent, child_name, new)
                swapped.append(name)
    return swapped
