"""Shared by every benchmark: paired timing; devices and the results format come from `sieve.results`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from sieve.results import RESULTS, device_name, git_commit, write_results

__all__ = ["RESULTS", "device_name", "git_commit", "timeit_paired", "write_results"]


def timeit_paired(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeat: int = 5,
                  sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each system, with their repetitions interleaved (A B A B ...), so drift in
    the machine's speed (other load, frequency) falls on all systems alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
