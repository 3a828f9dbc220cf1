"""``fastsam bench``: every benchmark subject, side by side per subject, in one run.

Plans (``--plan``):

=========  =======================================================================================
``full``   the default on a GPU: parameter sets small2000, resnet18, vit_b and (GPU only) ``huge``
           (1.07B values); grad_norm, first_step, second_step and the whole SAM step with SGD and
           AdamW bases; SDS selection for B = 128 ... 65536; end-to-end ResNet-18 (batch 128) and
           ViT at full size with every optimizer; torch.compile providers (<= 100 tensors).
``quick``  the default on CPU, about 1.5 minutes on 2 cores: small2000 and resnet18; no AdamW
           SAM step; reduced end-to-end sizes (named in each row); no torch.compile (inductor
           needs tens of seconds per op on CPU; ``--compile`` adds it).
``tiny``   seconds: a 10-tensor set, two batch sizes, toy end-to-end models (CI uses it).
=========  =======================================================================================

Results: one row per (op, provider, size, metric) appended to ``--out`` (a ``.csv`` file, or a
directory that gets ``results.csv``); by default ``bench/results/results.csv`` when run inside the
source tree, else ``results.csv`` in the current directory (never into an installed package). Every
row of the run shares one timestamp; a table is printed at the end. Then
``python -m fastsam.bench.plot --results FILE`` draws the PNG next to it and
``python -m fastsam.bench.report --results FILE`` rewrites the README's results block (``--print``
writes it to stdout). Also runnable as ``python -m fastsam.bench``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import bench_e2e, bench_first_step, bench_grad_norm, bench_sam_step, bench_sds_select, bench_second_step
from . import harness

SUBJECTS = ("grad_norm", "first_step", "second_step", "sam_step", "sds_select", "e2e")


@dataclass
class Plan:
    sets: tuple[str, ...]
    bases_second: tuple[str, ...]            # second_step bases
    bases_sam: tuple[str, ...]               # whole-SAM-step bases
    sds_batches: tuple[int, ...]
    e2e: str                                 # bench_e2e.PLANS key
    e2e_samples: int                         # at most, each of bench_e2e.STEPS_PER_SAMPLE steps
    e2e_min_samples: int
    kernel_budget_s: float | None            # CPU seconds of timing per (op, set)
    sds_budget_s: float | None
    e2e_budget_s: float | None
    min_rounds: int = 5
    compile: bool = False
    gpu_sets: tuple[str, ...] = field(default_factory=tuple)


PLANS = {
    "full": Plan(sets=("small2000", "resnet18", "vit_b"), gpu_sets=("huge",), bases_second=("sgd", "adamw"),
                 bases_sam=("sgd", "adamw"), sds_batches=bench_sds_select.BATCH_SIZES, e2e="full",
                 e2e_samples=10, e2e_min_samples=5, kernel_budget_s=20.0, sds_budget_s=2.0, e2e_budget_s=60.0,
                 compile=True),
    "quick": Plan(sets=("small2000", "resnet18"), bases_second=("sgd", "adamw"), bases_sam=("sgd",),
                  sds_batches=bench_sds_select.BATCH_SIZES, e2e="quick", e2e_samples=6, e2e_min_samples=2,
                  kernel_budget_s=3.0, sds_budget_s=0.4, e2e_budget_s=10.0),
    "tiny": Plan(sets=("tiny",), bases_second=("sgd", "adamw"), bases_sam=("sgd", "adamw"), sds_batches=(128, 1024),
                 e2e="tiny", e2e_samples=2, e2e_min_samples=2, kernel_budget_s=0.1, sds_budget_s=0.05,
                 e2e_budget_s=0.5, min_rounds=3),
}


def jobs(plan: Plan, device: torch.device, subjects: tuple[str, ...], sets: tuple[str, ...] | None,
         compile_: bool, copy_gbs: float) -> list[tuple[str, Callable[[], tuple[list, list]]]]:
    """(label, measure) pairs in run order."""
    out = []
    kw = dict(budget_s=plan.kernel_budget_s, compile_=compile_, copy_gbs=copy_gbs)
    chosen = sets or plan.sets + (plan.gpu_sets if device.type == "cuda" else ())
    for set_name in chosen:
        if "grad_norm" in subjects:
            out.append((f"grad_norm {set_name}", lambda s=set_name: bench_grad_norm.measure(s, device, **kw)))
        if "first_step" in subjects:
            out.append((f"first_step {set_name}", lambda s=set_name: bench_first_step.measure(s, device, **kw)))
        if "second_step" in subjects:
            for base in plan.bases_second:
                out.append((f"second_step_{base} {set_name}",
                            lambda s=set_name, b=base: bench_second_step.measure(s, device, base=b, **kw)))
        if "sam_step" in subjects:
            for base in plan.bases_sam:
                out.append((f"sam_step_{base} {set_name}",
                            lambda s=set_name, b=base: bench_sam_step.measure(s, device, base=b, **kw)))
    if "sds_select" in subjects:
        for batch in plan.sds_batches:
            out.append((f"sds_select B={batch}", lambda b=batch: bench_sds_select.measure(
                b, device, budget_s=plan.sds_budget_s, compile_=compile_)))
    if "e2e" in subjects:
        for setting in bench_e2e.PLANS[plan.e2e]:
            out.append((f"e2e {setting.model}", lambda s=setting: bench_e2e.measure(
                s, device, full=plan.e2e == "full", steps=plan.e2e_samples, min_steps=plan.e2e_min_samples,
                budget_s=plan.e2e_budget_s)))
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = parser or argparse.ArgumentParser(prog="fastsam bench", description=__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", choices=sorted(PLANS), default=None,
                    help="full (default on a GPU), quick (default on CPU), tiny (seconds)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--only", default=None, help=f"comma-separated subjects out of {','.join(SUBJECTS)}")
    ap.add_argument("--sets", default=None, help="comma-separated parameter sets (default: the plan's)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="time the torch.compile providers (default: on in the full plan)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None,
                    help="CSV file, or directory for results.csv, to append to (default: bench/results/ inside the "
                         "source tree, else the current directory)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastsam bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    plan_name = args.plan or ("full" if device.type == "cuda" else "quick")
    plan = PLANS[plan_name]
    subjects = SUBJECTS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in subjects if s not in SUBJECTS]
    if bad:
        print(f"fastsam bench: unknown subject(s) {bad}; choose from {', '.join(SUBJECTS)}", file=sys.stderr)
        return 2
    sets = None
    if args.sets:
        from .param_sets import PARAM_SETS

        sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
        unknown = [s for s in sets if s not in PARAM_SETS]
        if unknown:
            print(f"fastsam bench: unknown parameter set(s) {unknown}; choose from {', '.join(PARAM_SETS)}",
                  file=sys.stderr)
            return 2
    # Where the rows go, checked before minutes of timing: a bad --out fails now, in one line.
    out = harness.results_path(args.out)
    harness.check_writable_location(out)
    threads_note = harness.configure_threads(device, args.threads)
    compile_ = plan.compile if args.compile is None else args.compile

    from tqdm import tqdm

    t_start = time.perf_counter()
    stamp = harness.utc_stamp()
    dev_name = harness.device_name(device)
    copy_gbs, _ = harness.copy_bandwidth(device)
    rows = [dict(op="copy", provider="torch", size="copy", metric="gbps", value=harness.fmt(copy_gbs))]
    notes: list[str] = []
    todo = jobs(plan, device, subjects, sets, compile_, copy_gbs)
    if threads_note:
        print(f"fastsam bench: {threads_note}")
    print(f"fastsam bench: plan {plan_name} on {dev_name}; copy bandwidth {copy_gbs:.1f} GB/s; "
          f"{len(todo)} measurements{'; torch.compile on' if compile_ else ''}", flush=True)
    bar = tqdm(todo, desc="bench", unit="job", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    for label, measure in bar:
        bar.set_postfix_str(label)
        r, n = measure()
        rows += r
        notes += n
    bar.close()
    rows = [dict(r, device=dev_name) for r in rows]
    path = harness.append_rows(rows, out, stamp=stamp)
    print(harness.format_table([r for r in rows if r["op"] != "copy"]))
    for n in dict.fromkeys(notes):
        print("note:", n)
    if "e2e" in subjects:
        paper = bench_e2e.ESAM_PAPER
        print(f"reference (ESAM paper, V100, full size): SAM {paper['sam'] / paper['sgd']:.2f}x, "
              f"ESAM {paper['esam'] / paper['sgd']:.2f}x of SGD")
    print(f"\n{len(rows)} rows appended to {path} (device {dev_name}, timestamp {stamp}) "
          f"in {time.perf_counter() - t_start:.0f} s")
    print(f"plot: python -m fastsam.bench.plot --results {path}    "
          f"README table: python -m fastsam.bench.report --results {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
