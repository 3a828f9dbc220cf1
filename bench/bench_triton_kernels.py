"""Kernel benchmark of the Triton backend against the torch backend, per op, on a GPU.

For every op and parameter set, both backends are timed in the same run (``triton.testing.do_bench``
through ``harness.time_fn``) and the achieved bandwidth is reported as a fraction of the
device-to-device copy bandwidth measured in that same run (``dst.copy_(src)`` on a 1 GiB buffer,
counting bytes read plus written), which is the physical floor of these memory-bound ops.

Bytes per element (storage dtype size ``s``), as in the design's op table:

    grad_norm plain 1s, adaptive 2s | perturb 4s | restore 2s
    restore_sgd_step (momentum) 5s  | restore_adamw_step 7s (9s with amsgrad)

``sds_select`` / ``sds_weights`` are launch-bound (a few KB): their time is reported, not a rate.

Rows go to ``bench/results/triton_kernels.csv`` (op, provider, size, metric, value, device,
versions, commit, time). Run: ``python -m bench.bench_triton_kernels --sets resnet18 vit_b small2000``.
"""

from __future__ import annotations

import argparse

import torch

from . import harness
from .param_sets import PARAM_SETS, numel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("triton", "torch")


def copy_bandwidth(device: torch.device, nbytes: int = 2 ** 30) -> float:
    """Device-to-device copy rate in GB/s (read + write), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = harness.time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def _lists(shapes, dtype, device, gen, n, scale=1.0):
    return [[(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes] for _ in range(n)]


def op_cases(shapes, dtype, device):
    """(name, bytes per element in units of the dtype size, {provider: fn}) for each elementwise op."""
    from fastsam import ops

    gen = torch.Generator().manual_seed(0)
    w, g, b, m = _lists(shapes, dtype, device, gen, 4)
    v = [x.abs() for x in _lists(shapes, dtype, device, gen, 1, 1e-2)[0]]
    steps = [torch.tensor(10.0, device=device) for _ in shapes]
    norm = ops.grad_norm(g, backend="torch")

    def per_backend(fn):
        return {p: (lambda p=p: fn(p)) for p in PROVIDERS}

    cases = [
        ("grad_norm_plain", 1, per_backend(lambda be: ops.grad_norm(g, backend=be))),
        ("grad_norm_adaptive", 2, per_backend(lambda be: ops.grad_norm(g, w, mode="adaptive", eta=0.01, backend=be))),
        ("perturb", 4, per_backend(lambda be: ops.perturb_(w, g, b, norm, 1e-6, backend=be))),
        ("perturb_swp", 4, per_backend(lambda be: ops.perturb_(w, g, b, norm, 1e-6, beta=0.5, seed=1, backend=be))),
        ("restore", 2, per_backend(lambda be: ops.restore_(w, b, backend=be))),
        ("restore_sgd_step", 5, per_backend(lambda be: ops.restore_sgd_step_(w, g, b, m, lr=1e-6, momentum=0.9,
                                                                            backend=be))),
        ("restore_adamw_step", 7, per_backend(lambda be: ops.restore_adamw_step_(w, g, b, m, v, [], steps, lr=1e-6,
                                                                                backend=be))),
    ]
    return cases


def sds_cases(device):
    from fastsam import ops

    out = []
    for batch in (256, 4096, 65536):
        before, after = torch.rand(batch, device=device), torch.rand(batch, device=device)
        k = ops.sds_k(batch, 0.5)
        out.append((f"sds_select:B{batch}", {p: (lambda p=p: ops.sds_select(before, after, k, backend=p))
                                             for p in PROVIDERS}))
        out.append((f"sds_weights:B{batch}", {p: (lambda p=p: ops.sds_weights(before, after, backend=p))
                                              for p in PROVIDERS}))
    return out


def measure(set_names, dtype_names, device: torch.device) -> list[dict]:
    dev = harness.device_name(device)
    copy_gbs = copy_bandwidth(device)
    print(f"{dev}: device-to-device copy {copy_gbs:.0f} GB/s")
    rows = [dict(op="copy", provider="torch", size="1GiB", metric="GBps", value=f"{copy_gbs:.1f}", device=dev)]
    for set_name in set_names:
        shapes = PARAM_SETS[set_name]()
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            elements = numel(shapes)
            size = f"{set_name}:{len(shapes)}x{elements}:{dtype_name}"
            for op, units, fns in op_cases(shapes, dtype, device):
                times = {p: harness.time_fn(fn, device) for p, fn in fns.items()}
                nbytes = units * elements * dtype.itemsize
                line = [f"{set_name:>10} {dtype_name} {op:<20}"]
                for p, t in times.items():
                    gbs = nbytes / (t.median_ms * 1e-3) / 1e9
                    rows += [dict(op=op, provider=p, size=size, metric="median_ms", value=f"{t.median_ms:.5f}",
                                  device=dev),
                             dict(op=op, provider=p, size=size, metric="GBps", value=f"{gbs:.1f}", device=dev),
                             dict(op=op, provider=p, size=size, metric="fraction_of_copy",
                                  value=f"{gbs / copy_gbs:.3f}", device=dev)]
                    line.append(f"{p} {t.median_ms * 1e3:8.1f} us {gbs:7.0f} GB/s ({gbs / copy_gbs:5.1%})")
                ratio = times["torch"].median_ms / times["triton"].median_ms
                line.append(f"triton speed-up {ratio:.2f}x")
                print("  ".join(line))
    for name, fns in sds_cases(device):
        times = {p: harness.time_fn(fn, device) for p, fn in fns.items()}
        for p, t in times.items():
            rows.append(dict(op=name.split(":")[0], provider=p, size=name.split(":")[1], metric="median_ms",
                             value=f"{t.median_ms:.5f}", device=dev))
        print(f"{name:>22}  " + "  ".join(f"{p} {t.median_ms * 1e3:8.1f} us" for p, t in times.items()))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["resnet18", "vit_b", "small2000"], choices=sorted(PARAM_SETS))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--block", type=int, default=None, help="elements per program (tuning; default: the kernels')")
    ap.add_argument("--num-warps", type=int, default=None, help="warps per program (tuning)")
    ap.add_argument("--out", default=None, help="CSV file or directory (default: triton_kernels.csv in bench/results/ "
                    "inside the source tree, else in the current directory)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_kernels needs a CUDA device (the interpreter's CPU timings mean nothing)")
        return 2
    from fastsam.kernels import _multi_tensor

    _multi_tensor.BLOCK = args.block or _multi_tensor.BLOCK
    _multi_tensor.NUM_WARPS = args.num_warps or _multi_tensor.NUM_WARPS
    print(f"triton: BLOCK={_multi_tensor.BLOCK} num_warps={_multi_tensor.NUM_WARPS}")
    rows = measure(args.sets, args.dtypes, torch.device("cuda"))
    for row in rows:
        if row["provider"] == "triton":
            row["provider"] = f"triton-b{_multi_tensor.BLOCK}w{_multi_tensor.NUM_WARPS}"
    print(f"rows appended to {harness.append_rows(rows, harness.results_path(args.out, "triton_kernels.csv"))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
