"""Benchmark and evaluation results in DESIGN.md's format: one JSON per run under bench/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def device_name(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    model = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {torch.get_num_threads()} threads of {os.cpu_count()} cores ({model})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """What the user ran: `python bench/x.py ...` for scripts, `sieve ...` for the CLI entry point."""
    argv0 = sys.argv[0]
    head = ["python", os.path.relpath(argv0)] if argv0.endswith(".py") else [os.path.basename(argv0)]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def write_results(name: str, rows: list[dict], device: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {
        "name": name,
        "command": command_line(),
        "device": device,
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return out
