"""Every op on every backend that can run it (cuda vs triton vs torch), per size, side by side.

For each op and parameter set the median time of one backend call on one bucket is measured with
``harness.time_fn``; multi-tensor ops also report the achieved bandwidth (bytes read + written per
call / time) and its fraction of the measured device-to-device copy bandwidth (``dst.copy_(src)``
on a 256 MiB buffer, counted the same way). Rows go to ``bench/results/backends.csv``.

Per op, backends are then ranked by the geometric mean of their times over the sizes; with
``--write-table FILE`` the ranking becomes this GPU's entry of a ``backend="auto"`` table (see
``fastsam/ops/_autotune.py``; ``fastsam/auto_table.json`` is the shipped one).

Run: ``python -m fastsam.bench.bench_backends --device cuda [--sets small2000,resnet18,vit_b]
[--dtype float32] [--write-table fastsam/auto_table.json]``.
"""

from __future__ import annotations

import argparse

import torch

from . import harness
from .param_sets import PARAM_SETS, numel

# Elements read + written per parameter element, in units of the storage dtype (DESIGN.md's table).
LISTS_MOVED = {
    "grad_norm": 1,           # read g (plain)
    "perturb": 4,             # read w, g; write w, backup
    "restore": 2,             # read backup; write w
    "restore_sgd_step": 5,    # read backup, g, buf; write w, buf
    "restore_adamw_step": 7,  # read backup, g, m, v; write w, m, v
}
MULTI_TENSOR_OPS = tuple(LISTS_MOVED)
SDS_OPS = ("sds_select", "sds_weights")
SDS_BATCHES = (128, 1024, 8192, 65536)
LOCAL_SETS = {"tiny": lambda: [(1000,), (37, 3), (5,)]}  # a CPU smoke-test size


def op_args(op: str, shapes, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """Arguments of one backend call (the contracts in fastsam/ops/<op>.py) on fresh tensors."""
    def lst(scale=1.0, positive=False):
        xs = [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]
        return [x.abs() for x in xs] if positive else xs

    if op == "grad_norm":
        return lst(), None, "plain", 0.0
    if op == "perturb":
        return lst(), lst(1e-3), lst(), torch.tensor(1.0, device=device), 0.05, "plain", 0.0, 1e-12, 1.0, 0, 0
    if op == "restore":
        return lst(), lst()
    if op == "restore_sgd_step":
        return lst(), lst(1e-3), lst(), lst(1e-3), 0.1, 0.9, 0.0, False, 5e-4, False, False, None, None
    if op == "restore_adamw_step":
        steps = [torch.ones((), device=device) for _ in shapes]
        return (lst(), lst(1e-3), lst(), lst(1e-3), lst(1e-6, True), [], steps, 1e-3, 0.9, 0.999, 1e-8, 1e-2, False,
                False, None, None)
    raise KeyError(op)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate, bytes read + written per second (the roofline the ops are held to)."""
    src = torch.empty(64 << 20, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = harness.time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def backends_for(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    from fastsam import ops

    out = []
    for backend in ops.BACKENDS:
        ok = ops.supports(backend, op, device, dtype)[0]
        if ok and not (backend == "triton" and device.type == "cpu"):  # the interpreter is not a contender
            out.append(backend)
    return out


def measure(device: torch.device, sets: list[str], dtype: torch.dtype, sds: bool = True) -> tuple[list[dict], dict]:
    """Time every (op, size, backend); return CSV rows and {op: {backend: [ms per size]}}."""
    from fastsam import ops

    dev_name = harness.device_name(device)
    copy = copy_bandwidth_gbps(device) if device.type == "cuda" else float("nan")
    rows = [dict(op="copy", provider="torch", size="256MiB", metric="gbps", value=f"{copy:.1f}", device=dev_name)]
    print(f"device: {dev_name}; copy bandwidth {copy:.0f} GB/s (read + write)")
    timings: dict[str, dict[str, list[float]]] = {}
    gen = torch.Generator().manual_seed(0)
    elem = torch.empty((), dtype=dtype).element_size()
    for op in MULTI_TENSOR_OPS:
        backends = backends_for(op, device, dtype)
        for set_name in sets:
            shapes = (LOCAL_SETS.get(set_name) or PARAM_SETS[set_name])()
            size = f"{set_name}:{len(shapes)}x{numel(shapes)}:{str(dtype)[6:]}"
            nbytes = LISTS_MOVED[op] * numel(shapes) * elem
            for backend in backends:
                _, fn = ops.resolve(op, backend, device, dtype)
                args = op_args(op, shapes, device, dtype, gen)
                t = harness.time_fn(lambda fn=fn, args=args: fn(*args), device)
                gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                timings.setdefault(op, {}).setdefault(backend, []).append(t.median_ms)
                rows += [dict(op=op, provider=backend, size=size, metric="median_ms", value=f"{t.median_ms:.5f}",
                              device=dev_name),
                         dict(op=op, provider=backend, size=size, metric="gbps", value=f"{gbps:.1f}", device=dev_name),
                         dict(op=op, provider=backend, size=size, metric="fraction_of_copy",
                              value=f"{gbps / copy:.3f}", device=dev_name)]
                print(f"{op:>20} {size:<32} {backend:<7} {t.median_ms:9.4f} ms {gbps:8.1f} GB/s "
                      f"({gbps / copy:6.1%} of copy)")
    if sds:
        for op in SDS_OPS:
            for batch in SDS_BATCHES:
                before = torch.rand(batch, generator=gen).to(device)
                after = torch.rand(batch, generator=gen).to(device)
                args = (before, after, max(1, batch // 2)) if op == "sds_select" else (before, after, 1.0)
                for backend in backends_for(op, device, torch.float32):
                    _, fn = ops.resolve(op, backend, device, torch.float32)
                    t = harness.time_fn(lambda fn=fn, args=args: fn(*args), device)
                    timings.setdefault(op, {}).setdefault(backend, []).append(t.median_ms)
                    rows.append(dict(op=op, provider=backend, size=f"B={batch}", metric="median_ms",
                                     value=f"{t.median_ms:.5f}", device=dev_name))
                    print(f"{op:>20} {'B=' + str(batch):<32} {backend:<7} {t.median_ms:9.4f} ms")
    return rows, timings


def rank(timings: dict) -> dict[str, tuple[str, ...]]:
    """Per op, backends fastest first (geometric mean over sizes); only ops measured on 2+ backends."""
    from fastsam.ops import _autotune

    return {op: _autotune.order_from_timings(t) for op, t in timings.items() if len(t) > 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", default="small2000,resnet18,vit_b",
                        help=f"comma-separated parameter sets: {', '.join(list(PARAM_SETS) + list(LOCAL_SETS))}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-sds", action="store_true", help="skip the SDS ops")
    parser.add_argument("--out", default=None, help="results CSV or directory (default: backends.csv in bench/results/ inside the source tree, else in the current directory)")
    parser.add_argument("--write-table", default=None, metavar="FILE",
                        help="add this GPU's measured order to an auto-dispatch table (JSON)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in PARAM_SETS and s not in LOCAL_SETS]
    if unknown:
        parser.error(f"unknown parameter sets {unknown}")
    rows, timings = measure(device, sets, dtype, sds=not args.no_sds)
    path = harness.append_rows(rows, harness.results_path(args.out, "backends.csv"))
    print(f"results appended to {path}")
    orders = rank(timings)
    for op, order in orders.items():
        print(f"auto order for {op}: {' > '.join(order)}")
    if args.write_table:
        if device.type != "cuda":
            parser.error("--write-table records GPU measurements; run it with --device cuda")
        from fastsam.ops import _autotune

        name, arch = _autotune.device_identity(device)
        entry = _autotune.table_entry(name, arch, orders, source="bench_backends", dtype=args.dtype, sets=sets,
                                      **{k: v for k, v in harness.versions().items()})
        print(f"table entry for {name} ({arch}) written to {_autotune.write_entry(args.write_table, entry)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
