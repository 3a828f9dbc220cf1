"""Measured backend order for ``backend="auto"``: the fastest backend per op on the current GPU.

[note: measured dispatch]
On a CUDA device ``auto`` takes the first backend of ``_dispatch.auto_order(op, "cuda")`` that can run
the bucket. That order changes only from measurements, never from guesses:

1. A table of benchmark results: ``fastsam/auto_table.json`` (shipped), or the file named by
   ``FASTSAM_AUTO_TABLE``. ``python -m fastsam.bench.bench_backends --write-table FILE`` writes it on a
   GPU machine: per GPU (its name, with its compute capability as a fallback key) and per op, the
   backends fastest first, ranked by the geometric mean of their times over the benchmark's sizes.
2. A one-time timed probe, opt-in: ``FASTSAM_AUTOTUNE=1`` runs it at the first ``auto`` resolution on a
   GPU that the table does not list; :func:`autotune` runs it explicitly (and overrides the table).
   It times every available backend of every op on synthetic buckets and synchronises the device,
   so it is skipped (with a warning) while a CUDA graph is being captured or torch.compile traces;
   its result lasts for the process.

Without either, the default order of ``_dispatch`` stays. The order is kept per device *type*: in a
process with several different GPUs the first one resolved decides.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import _dispatch

TABLE_ENV = "FASTSAM_AUTO_TABLE"
AUTOTUNE_ENV = "FASTSAM_AUTOTUNE"
TABLE_FORMAT = 1
SHIPPED_TABLE = Path(__file__).resolve().parent.parent / "auto_table.json"

# Synthetic buckets for the probe: many small tensors (launch-bound) and a few large ones
# (bandwidth-bound), as (number of tensors, elements each).
PROBE_CASES = {"small": (200, 1000), "large": (8, 1 << 20)}

_applied: dict[str, str] = {}  # device type -> where its order came from ("table ...", "probe ...", "default")


# ------------------------------------------------------------------------------------------- table


def device_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, "sm_XY") of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm_{major}{minor}"


def table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or SHIPPED_TABLE)


def load_table(path: Path | str | None = None) -> dict:
    """The table as a dict (``{"format": 1, "devices": [...]}``); a missing file is an empty table."""
    path = Path(path) if path else table_path()
    if not path.exists():
        return {"format": TABLE_FORMAT, "devices": []}
    table = json.loads(path.read_text())
    if table.get("format") != TABLE_FORMAT or not isinstance(table.get("devices"), list):
        raise ValueError(f"{path} is not a fastsam auto table (format {TABLE_FORMAT})")
    return table


def lookup(table: dict, name: str, arch: str) -> dict | None:
    """The entry for a GPU: the same name first, else the same compute capability, else None."""
    for key, value in (("name", name), ("arch", arch)):
        for entry in table["devices"]:
            if entry.get(key) == value:
                return entry
    return None


def valid_orders(orders: dict) -> dict[str, tuple[str, ...]]:
    """Keep only well-formed orders (known backends, no repeats); a bad table entry must not break dispatch."""
    good = {}
    for op, order in orders.items():
        order = tuple(order)
        if order and len(set(order)) == len(order) and all(b in _dispatch.BACKENDS for b in order):
            good[op] = order
        else:
            warnings.warn(f"fastsam: ignoring the measured order {order!r} for {op!r} (unknown or repeated backend)")
    return good


def apply_orders(orders: dict, device_type: str = "cuda") -> None:
    for op, order in valid_orders(orders).items():
        _dispatch.set_auto_order(op, device_type, order)


def table_entry(name: str, arch: str, orders: dict, **info) -> dict:
    return {"name": name, "arch": arch, "orders": {op: list(o) for op, o in orders.items()},
            "measured": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **info}


def write_entry(path: Path | str, entry: dict) -> Path:
    """Add (or replace, by GPU name) one device's entry in a table file."""
    path = Path(path)
    table = load_table(path)
    table["devices"] = [e for e in table["devices"] if e.get("name") != entry["name"]] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return path


# ------------------------------------------------------------------------------------------- ranking


def order_from_timings(times: dict[str, list[float]]) -> tuple[str, ...]:
    """Backends fastest first by the geometric mean of their times over the same cases.

    Ties keep the default preference (cuda, triton, torch), so equal measurements change nothing.
    """
    cases = {len(v) for v in times.values()}
    if len(cases) != 1 or 0 in cases:
        raise ValueError("every backend needs one time per case")
    rank = {b: i for i, b in enumerate(_dispatch.BACKENDS)}

    def score(backend):
        return statistics.fmean(math.log(max(t, 1e-9)) for t in times[backend])

    return tuple(sorted(times, key=lambda b: (score(b), rank.get(b, len(rank)))))


# ------------------------------------------------------------------------------------------- probe


def _probe_calls(op: str, device: torch.device, dtype: torch.dtype, count: int, numel: int) -> tuple:
    """Arguments of one backend call of ``op`` on a synthetic bucket (see the op files' contracts)."""
    def lst(scale=1.0, positive=False):
        xs = [torch.randn(numel, device=device, dtype=dtype) * scale for _ in range(count)]
        return [x.abs() for x in xs] if positive else xs

    if op == "grad_norm":
        return lst(), lst(), "plain", 0.0
    if op == "perturb":
        return lst(), lst(), lst(), torch.tensor(1.0, device=device), 0.05, "plain", 0.0, 1e-12, 1.0, 0, 0
    if op == "restore":
        return lst(), lst()
    if op == "restore_sgd_step":
        return lst(), lst(), lst(), lst(), 0.1, 0.9, 0.0, False, 5e-4, False, False, None, None
    if op == "restore_adamw_step":
        steps = [torch.ones((), device=device) for _ in range(count)]
        return (lst(), lst(), lst(), lst(0.1), lst(0.01, True), [], steps, 1e-3, 0.9, 0.999, 1e-8, 1e-2, False,
                False, None, None)
    if op == "grad_dot":
        return lst(), lst()
    if op in ("gsam_combine", "looksam_orthogonal"):
        stats = torch.tensor([0.5, 2.0, 3.0], device=device)
        return (lst(), lst(), stats, 0.4) if op == "gsam_combine" else (lst(), lst(), lst(), stats)
    if op == "looksam_combine":
        one = torch.ones((), device=device)
        return lst(), lst(), one, one, 0.7
    if op in ("sds_select", "sds_weights"):
        batch = min(count * numel, 4096)
        before, after = torch.rand(batch, device=device), torch.rand(batch, device=device)
        return (before, after, max(1, batch // 2)) if op == "sds_select" else (before, after, 1.0)
    if op == "momentum_sam_sgd":
        return lst(), lst(), lst(0.1), torch.tensor(0.1, device=device), 0.1, 0.9, 5e-4, False
    if op == "momentum_sam_adamw":
        return lst(), lst(), lst(0.1), lst(0.01, True), torch.tensor(0.1, device=device), 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3
    if op == "momentum_sam_shift":
        return lst(), lst(), torch.tensor(-0.1, device=device), None
    if op == "sampa_extrapolate":
        return lst(), lst(), lst(), lst(), 0.1, 0.9, 5e-4
    if op == "grad_mix":
        return lst(), lst(), torch.tensor(0.5, device=device), torch.tensor(2.0, device=device), False, None
    if op == "ema_direction":
        return lst(), lst(), 1.0, 0.9, None
    if op == "per_tensor_norm":
        return (lst(),)
    if op == "perturb_per_tensor":
        return lst(), lst(), lst(), torch.full((count,), 0.05, device=device)
    if op == "bsam_noise":
        gen = torch.Generator(device=device)
        gen.manual_seed(0)
        return lst(), lst(), lst(positive=True), 1000, gen
    if op == "bsam_ascent":
        return lst(), lst(), lst(), lst(positive=True), lst(), 0.05, False
    if op == "bsam_step":
        return lst(), lst(), lst(), lst(), lst(positive=True), lst(positive=True), 0.1, 0.9, 0.999, 1e-4, 0.1
    raise KeyError(op)


def cuda_timer(run: Callable[[], object], device: torch.device, **_) -> float:
    """Median milliseconds of ``run`` over 10 timed calls after 3 warm-up calls (CUDA events)."""
    for _ in range(3):
        run()
    samples = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def probe(device: torch.device, ops: list[str] | None = None, dtype: torch.dtype = torch.float32,
          cases: dict | None = None, timer: Callable | None = None) -> dict[str, tuple[str, ...]]:
    """Time every backend that can run each op on ``device``; return the orders (fastest first).

    ``timer(run, device, op=, backend=, case=)`` returns milliseconds (injectable for tests); ops with
    fewer than two runnable backends are left out.
    """
    timer = timer or cuda_timer
    cases = cases or PROBE_CASES
    orders = {}
    for op in ops or sorted(_dispatch._registry):
        impls = _dispatch.implementations(op)
        backends = [b for b in _dispatch.BACKENDS if b in impls and _dispatch.supports(b, op, device, dtype)[0]]
        if len(backends) < 2:
            continue
        times = {b: [] for b in backends}
        for case, (count, numel) in cases.items():
            args = _probe_calls(op, device, dtype, count, numel)
            for b in backends:
                times[b].append(float(timer(lambda fn=impls[b]: fn(*args), device, op=op, backend=b, case=case)))
        orders[op] = order_from_timings(times)
    return orders


def autotune(device: torch.device | str | None = None, ops: list[str] | None = None,
             timer: Callable | None = None, cases: dict | None = None) -> dict[str, tuple[str, ...]]:
    """Probe now and make the measured orders the ``auto`` orders for the device's type (this process)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    orders = probe(device, ops=ops, timer=timer, cases=cases)
    apply_orders(orders, device.type)
    _applied[device.type] = f"probe in this process ({len(orders)} ops)"
    return orders


# ------------------------------------------------------------------------------------------- the hook


def _autotune_requested() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def _probe_is_safe() -> bool:
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:  # pragma: no cover - very old torch
        pass
    return not torch.cuda.is_current_stream_capturing()


def ensure_measured_order(device: torch.device) -> None:
    """Called by ``_dispatch.resolve`` for ``auto`` on a CUDA device: apply measurements once per process."""
    if device.type in _applied:
        return
    source = "default (no measurements for this GPU)"
    try:
        name, arch = device_identity(device)
        entry = lookup(load_table(), name, arch)
        if entry is not None:
            apply_orders(entry.get("orders", {}), device.type)
            source = f"table {table_path().name}: {entry['name']} ({entry['arch']})"
        elif _autotune_requested():
            if _probe_is_safe():
                _applied[device.type] = "probing"  # resolve() is re-entered by the probe itself
                autotune(device)
                return
            warnings.warn("fastsam: FASTSAM_AUTOTUNE=1 but the first resolution happens during CUDA graph capture "
                          "or torch.compile tracing; keeping the default backend order (call "
                          "fastsam.ops.autotune() beforehand)")
    except Exception as exc:  # a broken table or driver query must never break a training step
        warnings.warn(f"fastsam: measured backend order unavailable ({exc.__class__.__name__}: {exc}); "
                      "keeping the default order")
    _applied[device.type] = source


def describe(device_type: str = "cuda") -> str:
    """Where the ``auto`` order of a device type came from (for ``fastsam info``)."""
    return _applied.get(device_type, "not resolved yet")


def reset() -> None:
    """Forget applied measurements (tests)."""
    _applied.clear()
