"""Length-sorted batching by a token budget: similar lengths together, at most `budget` padded tokens a batch."""

from __future__ import annotations


def token_budget_batches(lengths: list[int], budget: int, max_batch: int = 256) -> list[list[int]]:
    """Indices grouped into batches, longest first, so that len(batch) * longest_in_batch <= budget.

    A single input longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > budget or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
