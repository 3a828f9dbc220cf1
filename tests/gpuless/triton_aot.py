"""Ahead-of-time compiles of every Triton kernel variant the launchers in ``kernels/`` produce.

``python tests/gpuless/triton_aot.py --out rows.csv [--archs 90,80] [--jobs N] [--full]`` compiles
each variant for each arch with the triton of the running interpreter (no GPU, no driver; the
process must not have ``TRITON_INTERPRET`` set) and writes one CSV row per kernel x variant x
target (see :data:`FIELDS`).

[note: which variants]
A variant is one set of constexpr values a launcher can pass. The dtype, the mode (norm geometry,
SWP), the alignment and the tile sizes are crossed in full: they change the memory access pattern
and the register footprint. The boolean feature flags of the fused optimizer steps (lr on the
device, momentum, first step, nesterov, maximize, grad scale, found-inf, weight decay, amsgrad,
the step counters' dtype) number 2^8 combinations per dtype for SGD alone; crossed in full with
everything else that is about 2000 compiles per target and toolchain, over an hour on CI's two
cores. So by default each kernel's flags are covered pairwise (every value of every pair of flags
appears together in some variant, plus all flags on, the heaviest, and all off), a set built
greedily and deterministically; ``--full`` (or ``FASTSAM_GPULESS_FULL=1``) compiles the full
product instead, for a machine with time to spare. Flags a launcher ties to another (``FIRST``
and ``NESTEROV`` mean nothing without momentum; ``N_LISTS`` follows momentum / amsgrad) are
derived, not varied.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]

FIELDS = ["kernel", "variant", "target", "toolchain", "registers", "spills", "stack", "local", "shared",
          "widest_load", "widest_store", "ldg", "stg", "ldg128", "stg128", "streaming", "vector_path",
          "compile_s"]


@dataclasses.dataclass
class Spec:
    """How a launcher calls one kernel: argument types, the constexpr axes it varies, fixed values."""

    name: str                      # module.kernel, as in the results table
    kernel: Callable               # the @triton.jit function
    signature: Callable[[dict], dict]  # constexprs -> {argument: Triton type} of the other arguments
    axes: dict                     # crossed in full: {constexpr: [values]}
    flags: tuple[str, ...] = ()    # booleans covered pairwise (all combinations with --full)
    derive: Callable[[dict], dict] = lambda c: c  # ties between constexprs, as the launcher makes them
    aligned: tuple[str, ...] = ()  # pointer arguments torch always allocates 16-byte aligned
    streaming: bool = False        # memory-bound streaming kernel: register limit applies
    vector_path: bool = False      # multi-tensor kernel: ALIGN=16 full blocks must use 128-bit accesses
    warps: Callable[[dict], int] = lambda c: 4  # num_warps the launcher passes for these constexprs


def covering_rows(candidates: list[dict], flags: tuple[str, ...]) -> list[dict]:
    """A subset of ``candidates`` (flag assignments a launcher can make) in which every pair of values
    of every pair of ``flags`` that occurs among the candidates occurs at least once; all flags on and
    all off (where possible) first. Greedy, deterministic."""
    if len(flags) <= 2:
        return list(candidates)

    def pairs(row):
        return {(a, row[a], b, row[b]) for a, b in itertools.combinations(flags, 2)}

    missing = set().union(*(pairs(r) for r in candidates))
    extremes = [r for r in candidates if all(r[f] for f in flags) or not any(r[f] for f in flags)]
    rows = []
    for row in extremes:
        rows.append(row)
        missing -= pairs(row)
    while missing:
        best = max(candidates, key=lambda r: len(pairs(r) & missing))  # the first best: deterministic
        rows.append(best)
        missing -= pairs(best)
    return rows


def variants(spec: Spec, full: bool = False) -> list[dict]:
    """Distinct constexpr dicts of ``spec`` (after the launcher's ties), in a fixed order."""
    out, seen = [], set()
    names = list(spec.axes)

    def key(c):
        return tuple(sorted((k, str(v)) for k, v in c.items()))

    for values in itertools.product(*spec.axes.values()):
        candidates, keys = [], set()
        for bits in itertools.product((False, True), repeat=len(spec.flags)):
            c = spec.derive({**dict(zip(names, values)), **dict(zip(spec.flags, bits))})
            if key(c) not in keys:
                keys.add(key(c))
                candidates.append(c)
        flags = tuple(f for f in spec.flags if f in candidates[0])
        for c in (candidates if full else covering_rows(candidates, flags)):
            if key(c) not in seen:
                seen.add(key(c))
                out.append(c)
    return out


def specs() -> list[Spec]:
    """Every kernel of ``kernels/`` with the axes its launcher varies (see each launcher)."""
    import triton.language as tl

    sys.path.insert(0, str(ROOT))
    from kernels import (_multi_tensor, ema_direction, grad_mix, grad_norm, momentum_sam, per_tensor_norm, perturb,
                         perturb_per_tensor, restore, restore_adamw_step, restore_sgd_step, sampa_extrapolate,
                         sds_select, sds_weights)
    from kernels import bsam_ascent, bsam_noise, bsam_step

    dtypes = [tl.float32, tl.bfloat16, tl.float16]
    block = _multi_tensor.BLOCK
    align = [_multi_tensor.ALIGNMENT, 1]
    ptr = {tl.float32: "*fp32", tl.bfloat16: "*bf16", tl.float16: "*fp16"}

    def device_scalar(present):  # absent device scalars are the table itself (an int64 dummy, never read)
        return "*fp32" if present else "*i64"

    def sgd_derive(c):
        c = dict(c)
        if not c["HAS_MOMENTUM"]:
            c["FIRST"] = c["NESTEROV"] = False
        c["N_LISTS"] = 4 if c["HAS_MOMENTUM"] else 3
        return c

    def adamw_derive(c):
        c = dict(c)
        c["STEP_DTYPE"] = tl.float64 if c["STEP_FP64"] else tl.float32
        c["N_LISTS"] = 7 if c["AMSGRAD"] else 6
        return c

    def sds_tiles(c):
        c = dict(c)
        c["BLOCK_I"], c["BLOCK_J"] = c.pop("TILES")
        return c

    # sds_select.tile_sizes on a GPU for every n up to 65536 (its TRITON_INTERPRET check is off here).
    tiles = sorted({sds_select.tile_sizes(1 << e) for e in range(0, 17)})
    table_scalars = {"meta": "*i64", "n_tensors": "i32"}
    return [
        Spec("perturb.perturb_kernel", perturb.perturb_kernel,
             lambda c: {**table_scalars, "norm_ptr": "*fp32", "rho": "fp32", "eta": "fp32", "eps": "fp32",
                        "beta": "fp32", "seed": "i64", "offset": "i64"},
             {"DTYPE": dtypes, "MODE": [0, 1, 2], "SWP": [False, True], "ALIGN": align, "BLOCK": [block]},
             aligned=("meta", "norm_ptr"), streaming=True, vector_path=True,
             warps=lambda c: perturb.swp_num_warps(c["SWP"]) or _multi_tensor.NUM_WARPS),
        Spec("restore.restore_kernel", restore.restore_kernel, lambda c: dict(table_scalars),
             {"DTYPE": dtypes, "ALIGN": align, "BLOCK": [block]}, aligned=("meta",), streaming=True,
             vector_path=True),
        Spec("grad_norm.grad_sq_norm_partials_kernel", grad_norm.grad_sq_norm_partials_kernel,
             lambda c: {**table_scalars, "partials": "*fp32", "eta": "fp32"},
             {"DTYPE": dtypes, "MODE": [0, 1, 2], "ALIGN": align, "BLOCK": [block]},
             derive=lambda c: {**c, "N_LISTS": 2 if c["MODE"] == 1 else 1}, aligned=("meta", "partials"),
             streaming=True, vector_path=True),
        Spec("grad_norm.sum_partials_kernel", grad_norm.sum_partials_kernel,
             lambda c: {"partials": "*fp32", "n": "i32", "out": "*fp32"}, {"BLOCK": [grad_norm.REDUCE_BLOCK]},
             aligned=("partials", "out"), streaming=True),
        Spec("restore_sgd_step.restore_sgd_step_kernel", restore_sgd_step.restore_sgd_step_kernel,
             lambda c: {**table_scalars, "lr_value": "fp32", "lr_ptr": device_scalar(c["LR_ON_DEVICE"]),
                        "momentum": "fp32", "one_minus_dampening": "fp32", "weight_decay": "fp32",
                        "grad_scale_ptr": device_scalar(c["HAS_GRAD_SCALE"]),
                        "found_inf_ptr": device_scalar(c["HAS_FOUND_INF"])},
             {"DTYPE": dtypes, "ALIGN": align, "BLOCK": [block]},
             flags=("LR_ON_DEVICE", "HAS_MOMENTUM", "FIRST", "NESTEROV", "MAXIMIZE", "HAS_GRAD_SCALE",
                    "HAS_FOUND_INF", "HAS_WEIGHT_DECAY"),
             derive=sgd_derive, aligned=("meta", "lr_ptr", "grad_scale_ptr", "found_inf_ptr"), streaming=True,
             vector_path=True, warps=lambda c: restore_sgd_step.NUM_WARPS),
        Spec("restore_adamw_step.restore_adamw_step_kernel", restore_adamw_step.restore_adamw_step_kernel,
             lambda c: {**table_scalars, "lr_value": "fp32", "lr_ptr": device_scalar(c["LR_ON_DEVICE"]),
                        **dict.fromkeys(("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "ln_beta1_hi",
                                         "ln_beta1_lo", "ln_beta2_hi", "ln_beta2_lo", "eps", "weight_decay"),
                                        "fp32"),
                        "grad_scale_ptr": device_scalar(c["HAS_GRAD_SCALE"]),
                        "found_inf_ptr": device_scalar(c["HAS_FOUND_INF"])},
             {"DTYPE": dtypes, "ALIGN": align, "BLOCK": [block]},
             flags=("STEP_FP64", "LR_ON_DEVICE", "AMSGRAD", "MAXIMIZE", "HAS_GRAD_SCALE", "HAS_FOUND_INF",
                    "HAS_WEIGHT_DECAY"),
             derive=adamw_derive, aligned=("meta", "lr_ptr", "grad_scale_ptr", "found_inf_ptr"), streaming=True,
             vector_path=True, warps=lambda c: restore_adamw_step.NUM_WARPS),
        Spec("restore_adamw_step.increment_steps_kernel", restore_adamw_step.increment_steps_kernel,
             lambda c: {"step_addresses": "*i64", "n_steps": "i32", "found_inf_ptr": device_scalar(c["HAS_FOUND_INF"])},
             {"STEP_DTYPE": [tl.float32, tl.float64], "HAS_FOUND_INF": [False, True],
              "BLOCK": [restore_adamw_step.STEP_BLOCK]}, aligned=("step_addresses", "found_inf_ptr")),
        Spec("perturb_per_tensor.perturb_per_tensor_kernel", perturb_per_tensor.perturb_per_tensor_kernel,
             lambda c: {**table_scalars, "scales": "*fp32"}, {"DTYPE": dtypes, "ALIGN": align, "BLOCK": [block]},
             aligned=("meta", "scales"), streaming=True, vector_path=True),
        Spec("per_tensor_norm.segment_sums_kernel", per_tensor_norm.segment_sums_kernel,
             lambda c: {**table_scalars, "partials": "*fp32", "out": "*fp32"},
             {"N_LISTS": [1], "ELEM_BLOCK": [block], "BLOCK": [per_tensor_norm.SEGMENT_BLOCK]},
             aligned=("meta", "partials", "out")),
        Spec("grad_mix.grad_mix_kernel", grad_mix.grad_mix_kernel,
             lambda c: {**table_scalars, "a_ptr": "*fp32", "b_ptr": "*fp32", "skip_ptr": "*fp32"},
             {"DTYPE": dtypes, "SWAP": [False, True], "HAS_SKIP": [False, True], "ALIGN": align, "BLOCK": [block]},
             aligned=("meta", "a_ptr", "b_ptr", "skip_ptr"), streaming=True, vector_path=True),
        Spec("ema_direction.ema_direction_kernel", ema_direction.ema_direction_kernel,
             lambda c: {**table_scalars, "sigma": "fp32", "lmbda": "fp32", "skip_ptr": "*fp32" if c["HAS_SKIP"] else "*i64"},
             {"DTYPE": dtypes, "HAS_SKIP": [False, True], "ALIGN": align, "BLOCK": [block]},
             aligned=("meta", "skip_ptr"), streaming=True, vector_path=True),
        Spec("momentum_sam.momentum_sam_sgd_kernel", momentum_sam.momentum_sam_sgd_kernel,
             lambda c: {**table_scalars, "partials": "*fp32", "s_ptr": "*fp32", "lr": "fp32", "momentum": "fp32",
                        "weight_decay": "fp32"},
             {"DTYPE": dtypes, "NESTEROV": [False, True], "HAS_WEIGHT_DECAY": [False, True], "ALIGN": align,
              "BLOCK": [block]},
             aligned=("meta", "partials", "s_ptr"), streaming=True, vector_path=True,
             warps=lambda c: momentum_sam.NUM_WARPS),
        Spec("momentum_sam.momentum_sam_adamw_kernel", momentum_sam.momentum_sam_adamw_kernel,
             lambda c: {**table_scalars, "partials": "*fp32", "s_ptr": "*fp32",
                        **dict.fromkeys(("step_size", "one_minus_beta1", "beta2", "one_minus_beta2",
                                         "bias_correction2_sqrt", "eps", "decay"), "fp32")},
             {"DTYPE": dtypes, "HAS_WEIGHT_DECAY": [False, True], "ALIGN": align, "BLOCK": [block]},
             aligned=("meta", "partials", "s_ptr"), streaming=True, vector_path=True,
             warps=lambda c: momentum_sam.NUM_WARPS),
        Spec("momentum_sam.momentum_sam_shift_kernel", momentum_sam.momentum_sam_shift_kernel,
             lambda c: {**table_scalars, "scale_ptr": "*fp32"},
             {"DTYPE": dtypes, "HAS_BACKUP": [False, True], "ALIGN": align, "BLOCK": [block]},
             derive=lambda c: {**c, "N_LISTS": 3 if c["HAS_BACKUP"] else 2}, aligned=("meta", "scale_ptr"),
             streaming=True, vector_path=True),
        Spec("sampa_extrapolate.sampa_extrapolate_kernel", sampa_extrapolate.sampa_extrapolate_kernel,
             lambda c: {**table_scalars, "lr": "fp32", "momentum": "fp32", "weight_decay": "fp32"},
             {"DTYPE": dtypes, "HAS_MOMENTUM": [False, True], "HAS_WEIGHT_DECAY": [False, True], "ALIGN": align,
              "BLOCK": [block]},
             derive=lambda c: {**c, "N_LISTS": 4 if c["HAS_MOMENTUM"] else 3}, aligned=("meta",), streaming=True,
             vector_path=True, warps=lambda c: sampa_extrapolate.NUM_WARPS),
        Spec("bsam_noise.bsam_noise_kernel", bsam_noise.bsam_noise_kernel,
             lambda c: {**table_scalars, "noise_ptr": "*fp32", "num_data": "fp32"},
             {"DTYPE": dtypes, "ALIGN": align, "BLOCK": [block]}, aligned=("meta",), streaming=True,
             vector_path=True, warps=lambda c: bsam_noise.NUM_WARPS),
        Spec("bsam_ascent.bsam_ascent_kernel", bsam_ascent.bsam_ascent_kernel,
             lambda c: {**table_scalars, "rho": "fp32"},
             {"DTYPE": dtypes, "ADAPTIVE": [False, True], "ALIGN": align, "BLOCK": [block]}, aligned=("meta",),
             streaming=True, vector_path=True, warps=lambda c: bsam_ascent.NUM_WARPS),
        Spec("bsam_step.bsam_step_kernel", bsam_step.bsam_step_kernel,
             lambda c: {**table_scalars, "lr_value": "fp32", "lr_ptr": device_scalar(c["LR_ON_DEVICE"]),
                        **dict.fromkeys(("one_minus_beta1", "one_minus_beta2", "weight_decay", "s_shift"), "fp32")},
             {"DTYPE": dtypes, "LR_ON_DEVICE": [False, True], "ALIGN": align, "BLOCK": [block]},
             aligned=("meta", "lr_ptr"), streaming=True, vector_path=True, warps=lambda c: bsam_step.NUM_WARPS),
        Spec("sds_select.sds_select_kernel", sds_select.sds_select_kernel,
             lambda c: {"before_ptr": ptr[c["LOSS_DTYPE"]], "after_ptr": ptr[c["LOSS_DTYPE"]], "n": "i32", "k": "i32",
                        "out_ptr": "*i64"},
             {"LOSS_DTYPE": dtypes, "TILES": tiles}, derive=sds_tiles, aligned=("before_ptr", "after_ptr", "out_ptr"),
             warps=lambda c: sds_select.num_warps(c["BLOCK_I"], c["BLOCK_J"])),
        Spec("sds_weights.sds_weights_kernel", sds_weights.sds_weights_kernel,
             lambda c: {"before_ptr": ptr[c["LOSS_DTYPE"]], "after_ptr": ptr[c["LOSS_DTYPE"]], "n": "i32",
                        "temperature": "fp32", "out_ptr": "*fp32"},
             {"LOSS_DTYPE": dtypes, "BLOCK": sorted({min(sds_weights.BLOCK, 1 << e) for e in range(0, 17)})},
             aligned=("before_ptr", "after_ptr", "out_ptr")),
    ]


def kernel_arguments(kernel) -> tuple[list[str], set[str]]:
    """(argument names, the constexpr ones) of a ``@triton.jit`` function (compiled or interpreted)."""
    import inspect

    params = inspect.signature(kernel.fn).parameters
    return list(params), {n for n, p in params.items() if "constexpr" in str(p.annotation)}


def _label(value) -> str:
    return str(value).replace("triton.language.", "")


def variant_label(c: dict) -> str:
    """``LOSS_DTYPE=fp32 MODE=1 ...``: the constexprs that vary (the fixed BLOCK and helper keys left out)."""
    return " ".join(f"{k}={_label(v)}" for k, v in c.items() if k not in ("BLOCK", "STEP_FP64")) or "-"


def _compile_one(job):
    """Worker: compile one (spec index, variant, arch); return a result row or an error row."""
    index, c, arch = job
    from gpuless import sass

    spec = specs_cached()[index]
    constexprs = {k: v for k, v in c.items() if k in kernel_arguments(spec.kernel)[1]}
    signature = spec.signature(c)
    t0 = time.perf_counter()
    row = {"kernel": spec.name, "variant": variant_label(c), "target": f"sm_{arch}", "toolchain": toolchain(),
           "streaming": int(spec.streaming), "vector_path": int(spec.vector_path and c.get("ALIGN") == 16)}
    try:
        code = sass.triton_cubin(spec.kernel, signature, constexprs, arch, spec.warps(c),
                                 tuple(a for a in spec.aligned if a in signature and signature[a].startswith("*")))
    except Exception as exc:  # a compile error is a result: the report fails on it
        row.update(error=f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return row
    counts = code.counts
    row.update(registers=code.registers, spills=code.spills, stack=code.stack, local=code.local, shared=code.shared,
               widest_load=counts["widest_load"], widest_store=counts["widest_store"], ldg=counts["LDG"],
               stg=counts["STG"], ldg128=counts["LDG.128"], stg128=counts["STG.128"],
               compile_s=round(time.perf_counter() - t0, 2))
    return row


_SPECS = None


def specs_cached():
    global _SPECS
    if _SPECS is None:
        _SPECS = specs()
    return _SPECS


def toolchain() -> str:
    import triton

    return f"triton {triton.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--archs", default="90,80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--full", action="store_true", default=os.environ.get("FASTSAM_GPULESS_FULL") == "1")
    parser.add_argument("--only", default="", help="comma-separated kernel name substrings")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpuless: TRITON_INTERPRET is set; ahead-of-time compiles need it unset", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    jobs = []
    for index, spec in enumerate(specs_cached()):
        if args.only and not any(s in spec.name for s in args.only.split(",")):
            continue
        for c in variants(spec, args.full):
            for arch in (int(a) for a in args.archs.split(",")):
                jobs.append((index, c, arch))
    t0 = time.perf_counter()
    rows = []
    if args.jobs > 1:
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_one, jobs, chunksize=4))
    else:
        rows = [_compile_one(j) for j in jobs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + ["error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    errors = sum(1 for r in rows if r.get("error"))
    print(f"gpuless: {toolchain()}: {len(rows)} kernel variants compiled for sm_{args.archs.replace(',', ', sm_')} "
          f"in {time.perf_counter() - t0:.0f} s ({errors} failed) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `gpuless`
    sys.exit(main())
