"""Shared benchmark harness: timing, environment facts, and the results data file.

Timing: on CUDA ``triton.testing.do_bench`` (warm-up, cache flush, quantiles 0.5/0.2/0.8); on CPU
a wall-clock loop with warm-up reporting the same quantiles. Results are appended as rows
``(op, provider, size, metric, value, device, torch, triton, commit, timestamp)`` to a CSV file
under ``bench/results/``; plots and README tables are made from that file by separate scripts.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIELDS = ["op", "provider", "size", "metric", "value", "device", "torch", "triton", "commit", "timestamp"]


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def spread(self) -> float:
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms else 0.0


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    return {"torch": torch.__version__, "triton": triton_version, "commit": commit}


def time_fn(fn, device: torch.device | str = "cpu", warmup: int = 3, reps: int = 15,
            min_seconds: float = 0.0) -> Timing:
    """Median and 20/80% quantiles of ``fn()``'s run time in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return Timing(*q)
    for _ in range(warmup):
        fn()
    samples = []
    t_end = time.perf_counter() + min_seconds
    while len(samples) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), qs[1], qs[7])


def time_interleaved(fns: dict, rounds: int = 30, warmup: int = 3) -> dict[str, Timing]:
    """CPU timing of several providers in interleaved rounds (A, B, C, A, B, C, ...).

    On a shared or thermally varying machine a provider timed alone in a quiet (or busy) minute is
    flattered (or penalised); interleaving exposes every provider to the same conditions, so their
    ratios are trustworthy even when absolute times drift.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, v in samples.items():
        qs = statistics.quantiles(v, n=10, method="inclusive")
        out[k] = Timing(statistics.median(v), qs[1], qs[7])
    return out


def append_rows(rows: list[dict], path: Path | str | None = None) -> Path:
    """Append result rows (dicts with FIELDS keys; environment fields filled in) to a CSV file."""
    path = Path(path) if path else RESULTS_DIR / "results.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    env = versions()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            full = {**env, "timestamp": stamp, **row}
            writer.writerow({k: full.get(k, "") for k in FIELDS})
    return path
