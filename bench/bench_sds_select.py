"""ESAM's sharpness-sensitive data selection: the ``k = int(gamma * B)`` sharpest samples of a batch.

Traffic: two loss vectors read (``2 * 4 * B`` bytes) and ``k`` int64 indices written; at these
sizes the op is launch-bound, so time (and launches) matter more than GB/s.

Providers: :func:`fastsam.ops.sds_select` per backend (exactly ``k``, deterministic ties, no host
sync), with ``--compile`` its torch backend under ``torch.compile``; the baseline is the official
ESAM code's selection (top-k for a cut-off, then a strict ``>`` mask whose ``nonzero`` syncs with
the host, :func:`bench.baselines.threshold_select`); ``torch.topk`` is the obvious one-liner.

Run: ``python -m fastsam.bench.bench_sds_select --batch 128 --batch 65536``.
"""

from __future__ import annotations

import argparse

import torch

from . import harness, providers
from .baselines import threshold_select, topk_select
from .harness import Instance

OP = "sds_select"
GAMMA = 0.5
BASELINE = "baseline-esam-code"
BATCH_SIZES = tuple(2 ** i for i in range(7, 17))  # 128 ... 65536


def builders(batch: int, device: torch.device, compile_: bool = False) -> dict:
    from fastsam import ops

    k = ops.sds_k(batch, GAMMA)
    seeds = iter(range(1000, 10 ** 6, 2))

    def losses():
        seed = next(seeds)
        gen = torch.Generator(device=device).manual_seed(seed)
        before = torch.rand(batch, generator=gen, device=device) * 3
        return before, before + 0.1 * torch.randn(batch, generator=gen, device=device)

    def wrap(fn):
        def make():
            lb, la = losses()
            return Instance(lambda: fn(lb, la, k))
        return make

    out = {f"fastsam-{b}": wrap(lambda lb, la, k, b=b: ops.sds_select(lb, la, k, backend=b))
           for b in providers.fastsam_backends((OP,), device)}
    if compile_:
        def make_compiled():
            fn = torch.compile(lambda lb, la, k: ops.sds_select(lb, la, k, backend="torch"))
            lb, la = losses()
            return Instance(lambda: fn(lb, la, k))
        out["fastsam-torch+compile"] = make_compiled
    out[BASELINE] = wrap(threshold_select)
    out["torch.topk"] = wrap(topk_select)
    return out


def size_label(batch: int) -> str:
    from fastsam import ops

    return f"B={batch},k={ops.sds_k(batch, GAMMA)}"


def measure(batch: int, device: torch.device, *, budget_s: float | None = 2.0,
            compile_: bool = False) -> tuple[list[dict], list[str]]:
    from fastsam import ops

    k = ops.sds_k(batch, GAMMA)
    return harness.measure_kernel(OP, size_label(batch), builders(batch, device, compile_), device,
                                  bytes_moved=8 * batch + 8 * k, instance_bytes=8 * batch, budget_s=budget_s,
                                  baseline=BASELINE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, action="append", help="batch size B (repeatable; default 128..65536)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch size (CPU)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    note = harness.configure_threads(device, args.threads)
    if note:
        print(note)
    rows, notes = [], []
    for batch in args.batch or BATCH_SIZES:
        r, n = measure(batch, device, budget_s=args.budget, compile_=args.compile)
        rows += r
        notes += n
    print(f"device: {harness.device_name(device)}")
    print(harness.format_table(rows))
    for n in notes:
        print("note:", n)
    path = harness.append_rows([dict(r, device=harness.device_name(device)) for r in rows], args.out)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
