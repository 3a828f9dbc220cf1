"""Wall time per step: SAMPa on two 1-thread processes (gloo) against SAM in one 2-thread process.

SAMPa (fastsam.SAMPa) computes its step's two gradients on two ranks at once and exchanges them with
one all-gather; SAM (fastsam.SAM) computes its two gradients one after the other, here with both
cores (2 intra-op threads). Both train the same network from the same weights on the same batch.

The two are measured in interleaved rounds inside the same two spawned processes, so that load
changes on a shared machine hit both alike: in each round rank 0 first times ``--steps`` SAM steps
with 2 threads and then, for context, ``--steps`` SAM steps with 1 thread (rank 1 waits in a
barrier), then both ranks time ``--steps`` SAMPa steps with 1 thread each. A step is the whole training-loop iteration (forward/backward passes, optimizer,
and for SAMPa the exchange), timed on rank 0 between barriers. Reported: the median over rounds of
the mean time per step, and ``ratio = sampa / sam`` (below 1: SAMPa is faster). On a machine
whose cores are oversubscribed by other jobs, 2 intra-op threads can be much slower than one (a
descheduled thread stalls the other at every parallel region), which is why SAM on one thread is
reported next to it.

Run: ``python -m bench.bench_sampa_cpu [--model digits,mlp] [--rounds 7] [--steps 10]``; rows go to
``bench/results/sampa_cpu.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

OUT = HERE / "results" / "sampa_cpu.csv"


def build(model_name: str):
    torch.manual_seed(0)
    if model_name == "digits":
        from fastsam.train import DigitsNet

        model, x = DigitsNet(), torch.randn(128, 1, 8, 8)
    elif model_name == "mlp":
        model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        x = torch.randn(256, 256)
    else:
        raise SystemExit(f"unknown model {model_name!r}")
    y = torch.randint(0, 10, (x.shape[0],))
    return model, x, y


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _worker(rank, port, model_name, rounds, steps, out):
    import fastsam

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    try:
        kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
        sam_model, x, y = build(model_name)
        sampa_model, _, _ = build(model_name)
        sam = fastsam.SAM(sam_model.parameters(), torch.optim.SGD, rho=0.05, **kw) if rank == 0 else None
        sampa = fastsam.SAMPa(sampa_model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, **kw)
        sam_closure, sampa_closure = closure_for(sam_model, x, y), closure_for(sampa_model, x, y)

        def sam_step():
            F.cross_entropy(sam_model(x), y).backward()
            sam.first_step(zero_grad=True)
            F.cross_entropy(sam_model(x), y).backward()
            sam.second_step(zero_grad=True)

        sam_ms, sam1_ms, sampa_ms = [], [], []
        for r in range(rounds + 1):  # round 0 warms up
            dist.barrier()
            if rank == 0:
                torch.set_num_threads(2)
                t0 = time.perf_counter()
                for _ in range(steps):
                    sam_step()
                t_sam = (time.perf_counter() - t0) / steps * 1e3
                torch.set_num_threads(1)  # context: SAM on one thread (what one core does alone)
                t0 = time.perf_counter()
                for _ in range(steps):
                    sam_step()
                t_sam1 = (time.perf_counter() - t0) / steps * 1e3
            torch.set_num_threads(1)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                sampa.step(sampa_closure)
            dist.barrier()
            t_sampa = (time.perf_counter() - t0) / steps * 1e3
            if rank == 0 and r > 0:
                sam_ms.append(t_sam)
                sam1_ms.append(t_sam1)
                sampa_ms.append(t_sampa)
        if rank == 0:
            params = sum(p.numel() for p in sam_model.parameters())
            torch.save({"sam": sam_ms, "sam1": sam1_ms, "sampa": sampa_ms, "params": params, "batch": x.shape[0],
                        "load": os.getloadavg()[0]}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_name: str, rounds: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.start_processes(_worker, args=(_free_port(), model_name, rounds, steps, out), nprocs=2, join=True,
                           start_method="spawn")
        return torch.load(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits,mlp", help="comma-separated: digits, mlp")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per round and method")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    from bench.harness import _cpu_model, versions

    v = versions()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    device = f"CPU {_cpu_model()} x{os.cpu_count()} (SAM: 1 process x 2 threads; SAMPa: 2 processes x 1 thread)"
    rows = []
    for name in args.model.split(","):
        r = measure(name.strip(), args.rounds, args.steps)
        sam, sampa = statistics.median(r["sam"]), statistics.median(r["sampa"])
        sam1 = statistics.median(r["sam1"])
        per_round = [b / a for a, b in zip(r["sam"], r["sampa"])]
        size = f"{name}:B{r['batch']}:{r['params']}p"
        print(f"{size:<28} SAM {sam:8.2f} ms/step   SAMPa {sampa:8.2f} ms/step   SAMPa/SAM {sampa / sam:5.2f} "
              f"(per-round ratios {min(per_round):.2f}-{max(per_round):.2f}; load average {r['load']:.1f}); "
              f"context: SAM on 1 thread {sam1:8.2f} ms/step, SAMPa/SAM-1-thread {sampa / sam1:5.2f}")
        for provider, value in (("sam_2threads", sam), ("sam_1thread", sam1), ("sampa_2x1thread", sampa)):
            rows.append(["train_step", provider, size, "median_ms", f"{value:.4f}"])
        rows.append(["train_step", "sampa_2x1thread", size, "ratio_to_sam", f"{sampa / sam:.4f}"])
        rows.append(["train_step", "sampa_2x1thread", size, "ratio_to_sam_1thread", f"{sampa / sam1:.4f}"])
        rows.append(["train_step", "machine", size, "load_average_1min", f"{r['load']:.2f}"])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["op", "provider", "size", "metric", "value", "device", "torch", "commit", "timestamp"])
        for row in rows:
            w.writerow(row + [device, v["torch"], v["commit"], stamp])
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
