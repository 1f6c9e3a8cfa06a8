"""Shared by every benchmark: paired timing; devices and the results format come from `sieve.results`."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from sieve.results import RESULTS, device_name, git_commit, write_results

__all__ = ["RESULTS", "cuda_graph_seconds", "device_name", "free_port", "git_commit", "plot_by_concurrency",
           "start_server", "stop", "timeit_paired", "write_results"]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a server process a bench starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], *, worker: bool = False, log=subprocess.DEVNULL, timeout: float = 300
                 ) -> tuple[subprocess.Popen, str]:
    """A `python -m sieve.service` process on a free loopback port with `env` added to this one's, (with its
    embedded worker when `worker`), once health says SERVING -> (process, "127.0.0.1:port")."""
    from sieve_client import SieveClient

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sieve.service", "--port", str(port),
                             *([] if worker else ["--no-worker"])], env=dict(os.environ, **env), stdout=log,
                            stderr=subprocess.STDOUT if log is not subprocess.DEVNULL else None,
                            start_new_session=True)
    with SieveClient(f"127.0.0.1:{port}") as c:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the Sieve server exited with {proc.returncode} (see its output)")
            try:
                c.wait_until_serving(timeout=2)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    stop(proc)
                    raise
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM a server process a bench started; kill it if it has not exited within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


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


def cuda_graph_seconds(fns: dict[str, Callable[[], object]], *, inner: int = 20, repeat: int = 10) -> dict[str, float]:
    """GPU seconds per call of each system: `inner` calls captured in one CUDA graph, replays timed with CUDA
    events (median of `repeat`, interleaved). Host launch overhead is left out, as in a graph-captured decode
    loop; what remains is the kernels' own time (METHOD.md: time many small launches as graph replays)."""
    import torch

    graphs = {}
    for name, fn in fns.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (and autotune) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        graphs[name] = graph
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plot_by_concurrency(rows: list[dict], path, panels: list[tuple[str, str]], xlabel: str = "concurrent callers",
                        log2_x: bool = False) -> None:
    """One line per row["system"] against row["concurrency"], in one panel per (field, title); saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (field, title) in zip(axes[0], panels):
        for system in dict.fromkeys(r["system"] for r in rows):
            mine = [r for r in rows if r["system"] == system]
            ax.plot([r["concurrency"] for r in mine], [r[field] for r in mine], marker="o", label=system)
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
