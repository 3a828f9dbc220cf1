"""Shared benchmark harness: timing, launch counts, bandwidth, environment facts, the results file.

Timing
------
* CUDA: ``triton.testing.do_bench`` (warm-up, L2 flush before every call, quantiles 0.5/0.2/0.8).
  A case with an untimed ``prepare`` step (e.g. ``second_step`` needs a ``first_step`` before it)
  goes through :func:`_cuda_event_bench`, the same loop written out with ``prepare`` outside the
  timed region.
* CPU: a wall-clock loop with warm-up. Several providers are timed in *interleaved rounds*
  (A, B, C, A, B, C, ...): on a shared or thermally drifting machine every provider then sees the
  same conditions, and speed-ups are taken as the median of the per-round ratios.

[note: rotating inputs]
A provider timed on one small set of tensors over and over finds them in the last-level cache and
looks faster than it would inside a training step, where the model's activations have evicted them.
On CPU each provider therefore gets ``rotation_count`` independent copies of its inputs and cycles
through them, so that three times the LLC is touched (by its other copies and by the providers
interleaved with it) between two uses of one copy. An instance's untimed ``prepare`` (e.g. the
``first_step`` before a timed ``second_step``) runs before the provider's next call, which uses the
next copy: preparing never warms the cache for the call being timed. On CUDA ``do_bench`` zeroes
a 256 MB buffer before every call, which flushes the L2 already.

Results are appended as rows ``(op, provider, size, metric, value, device, torch, triton, commit,
timestamp)`` to a CSV file (``bench/results/`` in a source checkout, else ``--out`` or the current
directory: [note: where results go]); every row of one ``fastsam bench`` run shares
one timestamp, which is how plots and the README report find the latest measurement of each
(device, op, size).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

# [note: where results go] Inside a source checkout (``bench/`` beside ``setup.py``) the stored
# results live in ``bench/results/``, which the README report and plot read. An installed package
# (``site-packages/fastsam/bench``) is never written to: results go to ``--out`` or, by default, to
# ``results.csv`` in the current directory. The default is the source tree's file only while the
# current directory is inside that tree, so an editable install run from elsewhere behaves like an
# installed one.
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT: Path | None = (PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "setup.py").is_file()
                            and PACKAGE_DIR.name == "bench" else None)
RESULTS_DIR = PACKAGE_DIR / "results"          # the source tree's stored results (inside a checkout)
RESULTS_FILE = RESULTS_DIR / "results.csv"
RESULTS_NAME = "results.csv"
FIELDS = ["op", "provider", "size", "metric", "value", "device", "torch", "triton", "commit", "timestamp"]

BASELINE = "baseline-per-param"
PEERS = ("peer-foreach-off", "peer-foreach-on", "peer")


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Run time of one provider in milliseconds: median and 20/80% quantiles (plus raw samples).

    ``paired``: sample i was taken in round i of interleaved rounds shared with other providers.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: list = field(default_factory=list, repr=False, compare=False)
    paired: bool = False

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the relative width of the middle 60% of the samples."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms else 0.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU {_cpu_model()} x{os.cpu_count()} ({threads} thread{'' if threads == 1 else 's'})"


def versions() -> dict:
    """torch / triton versions and the git commit (``-dirty`` when the checkout has changes)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if SOURCE_ROOT is None:  # an installed package: its version, not the git state of whatever encloses it
        from fastsam.version import __version__

        return {"torch": torch.__version__, "triton": triton_version, "commit": f"fastsam-{__version__}"}
    commit = "unknown"
    try:
        here = Path(__file__).parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=here, timeout=10).stdout.strip()
            if dirty:
                commit += "-dirty"
    except Exception:
        pass
    return {"torch": torch.__version__, "triton": triton_version, "commit": commit}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def busy() -> bool:
    """More runnable work than cores over the last minute (others' processes included)."""
    return load_average() > cores() - 0.5


def configure_threads(device: torch.device | str, threads: int | None = None) -> str | None:
    """Set torch's CPU threads for timing; returns a note when it chose one thread by itself.

    [note: CPU threads on a busy machine] With more runnable processes than cores, a parallel CPU
    kernel waits at its barrier for a descheduled worker thread: on a loaded 2-core machine we
    measured 0.04 ms calls taking 100 ms with 2 threads. One thread keeps the figures about the
    code, not the scheduler; an explicit ``threads`` always wins.
    """
    if threads:
        torch.set_num_threads(threads)
        return None
    if torch.device(device).type == "cpu" and torch.get_num_threads() > 1 and busy():
        torch.set_num_threads(1)
        return (f"the machine is busy (load average {load_average():.1f} on {cores()} cores): timing with one "
                "CPU thread (--threads N overrides)")
    return None


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device | str = "cpu") -> int:
    """L2 size on CUDA, the largest CPU cache level otherwise (32 MiB if it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or (32 << 20)


def rotation_count(bytes_per_instance: int, device: torch.device | str = "cpu", cap: int = 8,
                   interleaved_with: int = 0) -> int:
    """Copies of a working set needed so that between two uses of one copy three times the
    last-level cache has been touched (1 on CUDA, where ``do_bench`` flushes the L2).

    With ``interleaved_with`` other providers of the same working-set size taking turns in between,
    their traffic counts too: ``R * (others + 1) - 1`` sets pass between two uses of a copy.
    """
    device = torch.device(device)
    if device.type == "cuda" or bytes_per_instance <= 0:
        return 1
    sets_needed = 3 * last_level_cache_bytes(device) / bytes_per_instance
    if sets_needed < 1:
        return 1
    # At least two copies, so that an instance's untimed prepare never runs right before its own call.
    return max(2, min(cap, math.ceil((sets_needed + 1) / (interleaved_with + 1))))


# --------------------------------------------------------------------------------------------
# cases and timing
# --------------------------------------------------------------------------------------------

@dataclass
class Instance:
    """One copy of a provider's inputs: ``run`` is timed; ``prepare`` (untimed) readies the next run."""

    run: Callable[[], object]
    prepare: Callable[[], object] | None = None


class Case:
    """A provider's timed callable over one or more rotating :class:`Instance` copies.

    ``before()`` is called untimed before every ``run()``: it prepares the instance used last (so
    its preparation is as far as possible from its next use) and moves on to the next one.
    """

    def __init__(self, instances: list[Instance]):
        if not instances:
            raise ValueError("a case needs at least one instance")
        self.instances = instances
        self._i = 0
        self._last = None

    @property
    def needs_before(self) -> bool:
        return len(self.instances) > 1 or self.instances[0].prepare is not None

    def before(self) -> None:
        if self._last is not None and self._last.prepare is not None:
            self._last.prepare()
        self._i = (self._i + 1) % len(self.instances)

    def run(self):
        inst = self.instances[self._i]
        self._last = inst
        return inst.run()

    def call(self):
        """One untimed-prepare + run pair (warm-up, validation, launch counting)."""
        self.before()
        return self.run()

    def prime(self) -> None:
        """Run every instance once and leave each prepared (first calls allocate state, compile, ...)."""
        for inst in self.instances:
            inst.run()
            if inst.prepare is not None:
                inst.prepare()
        self._last = None


def _quantiles(samples: list[float]) -> Timing:
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], list(samples))
    qs = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), qs[1], qs[7], list(samples))


def _cuda_event_bench(case: Case, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """``do_bench``'s loop with the case's ``before()`` outside the timed region."""
    device = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    case.call()
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    est = []
    for _ in range(5):
        case.before()
        flush.zero_()
        start.record()
        case.run()
        end.record()
        synchronize(device)
        est.append(start.elapsed_time(end))
    per_call = max(statistics.median(est), 1e-3)
    for _ in range(max(1, int(warmup_ms / per_call))):
        case.call()
    n = max(5, int(rep_ms / per_call))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        case.before()
        flush.zero_()
        starts[i].record()
        case.run()
        ends[i].record()
    synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _as_case(fn) -> Case:
    return fn if isinstance(fn, Case) else Case([Instance(fn)])


def time_fn(fn, device: torch.device | str = "cpu", warmup: int = 3, reps: int = 15,
            min_seconds: float = 0.0) -> Timing:
    """Median and 20/80% quantiles of one callable's (or :class:`Case`'s) run time in milliseconds."""
    device = torch.device(device)
    case = _as_case(fn)
    if device.type == "cuda":
        if not case.needs_before:
            import triton.testing

            q = triton.testing.do_bench(case.run, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
            return Timing(*q)
        return _cuda_event_bench(case)
    for _ in range(warmup):
        case.call()
    samples = []
    t_end = time.perf_counter() + min_seconds
    while len(samples) < reps or time.perf_counter() < t_end:
        case.before()
        t0 = time.perf_counter()
        case.run()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def time_interleaved(fns: dict, rounds: int = 30, warmup: int = 3, *, min_rounds: int = 5,
                     budget_s: float | None = None, progress: Callable[[], None] | None = None) -> dict[str, Timing]:
    """CPU timing of several providers in interleaved rounds (A, B, C, A, B, C, ...).

    On a shared or thermally varying machine a provider timed alone in a quiet (or busy) minute is
    flattered (or penalised); interleaving exposes every provider to the same conditions, so their
    ratios are trustworthy even when absolute times drift. Runs ``rounds`` rounds, or fewer (but at
    least ``min_rounds``) once ``budget_s`` seconds have passed. ``fns`` maps names to callables or
    :class:`Case` objects.
    """
    cases = {k: _as_case(f) for k, f in fns.items()}
    for _ in range(warmup):
        for case in cases.values():
            case.call()
    samples = {k: [] for k in cases}
    t_stop = None if budget_s is None else time.perf_counter() + budget_s
    for r in range(rounds):
        if r >= min_rounds and t_stop is not None and time.perf_counter() > t_stop:
            break
        for k, case in cases.items():
            case.before()
            t0 = time.perf_counter()
            case.run()
            samples[k].append((time.perf_counter() - t0) * 1e3)
        if progress is not None:
            progress()
    out = {k: _quantiles(v) for k, v in samples.items()}
    for t in out.values():
        t.paired = True
    return out


def speedup(timings: dict[str, Timing], fast: str, slow: str) -> float:
    """How many times faster ``fast`` is than ``slow``.

    With paired samples (interleaved rounds: sample i of each provider comes from the same round)
    this is the median of the per-round ratios, which cancels drift common to both; otherwise the
    ratio of the medians.
    """
    a, b = timings[fast], timings[slow]
    if a.paired and b.paired and len(a.samples) == len(b.samples) > 1:
        return statistics.median(s / f for f, s in zip(a.samples, b.samples) if f > 0)
    return b.median_ms / a.median_ms


# --------------------------------------------------------------------------------------------
# launches and bandwidth
# --------------------------------------------------------------------------------------------

# Ops that allocate or alias without touching data: they launch no kernel.
_NO_KERNEL_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                            "_to_copy_noop", "lift_fresh", "set_", "resize_"})


def count_launches(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Work items launched by one call of ``fn``.

    CUDA: device activities (kernels, memcpy, memset) recorded by ``torch.profiler``, so Triton and
    extension kernels count too. CPU: aten ops dispatched (``TorchDispatchMode``), views and bare
    allocations excluded; a CPU ``_foreach_*`` op counts once although it loops over its tensors.
    Returns None when counting is not possible (e.g. inductor-generated CPU code bypasses dispatch).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL_OPS:
                _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


COPY = "copy"


def copy_buffer_bytes(device: torch.device | str) -> int:
    """Size of the copy that measures bandwidth: large enough to miss every cache (1 GiB on CUDA,
    4x the LLC and at least 128 MiB on CPU)."""
    device = torch.device(device)
    return (1 << 30) if device.type == "cuda" else max(128 << 20, 4 * last_level_cache_bytes(device))


def copy_builder(device: torch.device | str, nbytes: int | None = None) -> Callable[[], Instance]:
    """A builder of ``dst.copy_(src)`` instances; every instance shares one pair of buffers."""
    device = torch.device(device)
    n = (nbytes or copy_buffer_bytes(device)) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    return lambda: Instance(lambda: dst.copy_(src))


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None) -> tuple[float, Timing]:
    """Device-to-device copy bandwidth in GB/s (bytes read plus written), and its timing: the
    memory system's practical ceiling the kernels are held against."""
    device = torch.device(device)
    nbytes = nbytes or copy_buffer_bytes(device)
    t = time_fn(copy_builder(device, nbytes)().run, device, warmup=3, reps=15)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9, t


# --------------------------------------------------------------------------------------------
# sizes, rows, the results file
# --------------------------------------------------------------------------------------------

def size_label(set_name: str, shapes) -> str:
    """``name:<tensors>x<values>``, e.g. ``resnet18:62x11173962``."""
    return f"{set_name}:{len(shapes)}x{sum(math.prod(s) for s in shapes)}"


def size_value(size: str) -> float:
    """The numeric x of a size label: values for ``name:TxN``, ``B`` for ``B=...``; NaN otherwise."""
    try:
        if ":" in size and "x" in size.split(":", 1)[1]:
            return float(size.split(":", 1)[1].split("x", 1)[1])
        if size.startswith("B="):
            return float(size[2:].split(",", 1)[0])
    except ValueError:
        pass
    return float("nan")


def fmt(value: float) -> str:
    return f"{value:.6g}"


def in_source_tree(path: Path | str | None = None) -> bool:
    """Whether ``path`` (default: the current directory) lies inside the source checkout."""
    if SOURCE_ROOT is None:
        return False
    path = Path(path or Path.cwd()).resolve()
    return path == SOURCE_ROOT or SOURCE_ROOT in path.parents


def default_results_dir() -> Path:
    """``bench/results`` when run from inside the source tree, else the current directory."""
    return RESULTS_DIR if in_source_tree() else Path.cwd()


def results_path(out: Path | str | None = None, name: str = RESULTS_NAME) -> Path:
    """The CSV file a run appends to: ``out`` itself when it names a ``.csv`` file, ``out/name`` when it
    names a directory, the default directory's ``name`` when it is None (see [note: where results go])."""
    if out is None:
        return default_results_dir() / name
    out = Path(out)
    return out if out.suffix.lower() == ".csv" else out / name


def check_writable_location(path: Path) -> None:
    if SOURCE_ROOT is None and (path.resolve() == PACKAGE_DIR.parent
                                or PACKAGE_DIR.parent in path.resolve().parents):
        raise SystemExit(f"fastsam bench: refusing to write {path} inside the installed package; "
                         "choose another place with --out")


def append_rows(rows: list[dict], path: Path | str | None = None, *, stamp: str | None = None) -> Path:
    """Append result rows (dicts with FIELDS keys; environment fields filled in) to a CSV file
    (``path`` as :func:`results_path` reads it)."""
    path = results_path(path)
    check_writable_location(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise SystemExit(f"fastsam bench: {path} exists and is not a fastsam results file (its header is "
                             f"{','.join(header)[:80]!r}); choose another file with --out")
    env = versions()
    stamp = stamp or utc_stamp()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            full = {**env, "timestamp": stamp, **row}
            writer.writerow({k: full.get(k, "") for k in FIELDS})
    return path


def read_rows(path: Path | str | None = None) -> list[dict]:
    """The stored rows of a results file (``path`` as :func:`results_path` reads it; [] if absent)."""
    path = results_path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """Per device, the latest measurement of every (op, size): the rows of the most recent run that
    measured it. Each (op, size) group thus comes from one run (its providers side by side), and a
    partial run (``--only``, ``--sets``, ``--compile``) updates just the groups it measured."""
    latest: dict[tuple[str, str, str], str] = {}
    for r in rows:
        key = (r["device"], r["op"], r["size"])
        if r["timestamp"] > latest.get(key, ""):
            latest[key] = r["timestamp"]
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["timestamp"] == latest[(r["device"], r["op"], r["size"])]:
            out.setdefault(r["device"], []).append(r)
    return out


# --------------------------------------------------------------------------------------------
# one kernel subject: providers side by side -> rows
# --------------------------------------------------------------------------------------------

def _available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def _derived_rows(op: str, size: str, timings: dict[str, Timing], bytes_moved: int | None,
                  copy_gbs: float | None, baseline: str = BASELINE, copy_timing: Timing | None = None,
                  copy_bytes: int = 0) -> list[dict]:
    rows = []

    def add(provider, metric, value):
        rows.append(dict(op=op, provider=provider, size=size, metric=metric, value=fmt(value)))

    def fraction(t: Timing) -> float:
        """Achieved GB/s over copy GB/s; per round (then the median) when the copy was interleaved."""
        if copy_timing is not None and t.paired and copy_timing.paired and len(t.samples) == len(copy_timing.samples):
            return statistics.median(bytes_moved * c / (copy_bytes * s) for s, c in zip(t.samples, copy_timing.samples))
        return bytes_moved / (t.median_ms * 1e-3) / 1e9 / copy_gbs

    if copy_timing is not None:
        add(COPY, "gbps", copy_bytes / (copy_timing.median_ms * 1e-3) / 1e9)
    peers = [p for p in PEERS if p in timings]
    best_peer = min(peers, key=lambda p: timings[p].median_ms) if peers else None
    for name, t in timings.items():
        add(name, "median_ms", t.median_ms)
        add(name, "p20_ms", t.p20_ms)
        add(name, "p80_ms", t.p80_ms)
        if bytes_moved:
            add(name, "gbps", bytes_moved / (t.median_ms * 1e-3) / 1e9)
            if copy_gbs:
                add(name, "bw_fraction", fraction(t))
        if name == baseline or name in PEERS:
            continue
        if baseline in timings:
            add(name, "speedup_vs_baseline", speedup(timings, name, baseline))
        if best_peer is not None:
            add(name, "speedup_vs_peer", speedup(timings, name, best_peer))
    return rows


def time_builders(op: str, size: str, builders: dict[str, Callable[[], Instance]], device: torch.device, *,
                  instance_bytes: int = 0, budget_s: float | None = None, rounds: int = 200, min_rounds: int = 5,
                  warmup: int = 2, count: bool = True, cuda_rep_ms: float = 100,
                  interleave: bool | None = None) -> tuple[dict[str, Timing], list[dict], list[str]]:
    """Build and time every provider of one (op, size) side by side: (timings, rows, notes).

    ``builders`` map provider names to functions that build one ready-to-run :class:`Instance`
    (fresh tensors each call: the rotation calls it several times); ``instance_bytes`` is the
    working set of one instance (for the rotation count). A builder (or first call) that raises
    skips its provider with a note. Providers whose name ends in ``+compile`` are primed (compiled)
    once and their compile time stored as ``compile_s``; ``launches`` rows come from
    :func:`count_launches` when ``count``.

    CPU: all providers are built, then timed in interleaved rounds (sequentially, with a note, if
    their copies would not fit comfortably in memory). CUDA: built, timed and freed one at a time,
    so parameter sets of a billion values fit. ``interleave`` forces either way on CPU.
    """
    notes: list[str] = []
    rows: list[dict] = []
    compile_rows: list[dict] = []
    if device.type == "cuda":
        interleave = False
    elif interleave is None:
        interleave = True
        reps = rotation_count(instance_bytes, device, interleaved_with=len(builders) - 1)
        if instance_bytes * reps * len(builders) > 0.4 * _available_memory_bytes():
            interleave = False
            notes.append(f"{op} {size}: providers timed one after another (not enough memory to hold all at once)")
    reps = rotation_count(instance_bytes, device, interleaved_with=len(builders) - 1 if interleave else 0)

    def build(name: str, make: Callable[[], Instance]) -> Case | None:
        compiled = name.endswith("+compile")
        try:
            case = Case([make() for _ in range(1 if compiled else reps)])
            t0 = time.perf_counter()
            case.prime()
            synchronize(device)
            if compiled:
                compile_rows.append(dict(op=op, provider=name, size=size, metric="compile_s",
                                         value=fmt(time.perf_counter() - t0)))
            return case
        except Exception as exc:  # noqa: BLE001 - a failing provider is reported, not fatal
            lines = str(exc).strip().splitlines()
            reason = next((l for l in lines if "Error" in l or "error" in l), lines[0] if lines else "")
            notes.append(f"{op} {size}: {name} skipped: {type(exc).__name__}: {reason[:300]}")
            return None

    def launches(name: str, case: Case) -> None:
        if not count or name == COPY or (device.type != "cuda" and name.endswith("+compile")):
            return  # inductor's CPU code bypasses the dispatcher: nothing honest to count
        case.before()
        n = count_launches(case.run, device)
        if n is not None:
            rows.append(dict(op=op, provider=name, size=size, metric="launches", value=str(n)))

    timings: dict[str, Timing] = {}
    if interleave:
        cases = {}
        for name, make in builders.items():
            case = build(name, make)
            if case is not None:
                cases[name] = case
        timings = time_interleaved(cases, rounds=rounds, warmup=warmup, min_rounds=min_rounds, budget_s=budget_s)
        for name, case in cases.items():
            launches(name, case)
        del cases
    else:
        per_provider = None if budget_s is None else budget_s / max(1, len(builders))
        for name, make in builders.items():
            case = build(name, make)
            if case is None:
                continue
            if device.type == "cuda":
                timings[name] = (time_fn(case, device) if cuda_rep_ms == 100
                                 else _cuda_event_bench(case, warmup_ms=cuda_rep_ms / 4, rep_ms=cuda_rep_ms))
            else:
                timings[name] = time_fn(case, device, warmup=warmup, reps=min_rounds, min_seconds=per_provider or 0)
            launches(name, case)
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return timings, rows + compile_rows, notes


def measure_kernel(op: str, size: str, builders: dict[str, Callable[[], Instance]], device: torch.device, *,
                   bytes_moved: int | None = None, instance_bytes: int = 0, copy_gbs: float | None = None,
                   budget_s: float | None = None, rounds: int = 200, min_rounds: int = 5,
                   count: bool = True, baseline: str = BASELINE) -> tuple[list[dict], list[str]]:
    """:func:`time_builders`, plus the derived rows: GB/s from ``bytes_moved`` (the per-call traffic
    of DESIGN.md's op table), its fraction of the copy bandwidth (only when ``copy_gbs``, the run's
    copy bandwidth, is given), and speed-ups over the ``baseline`` provider and the fastest peer.
    Returns (rows, notes).

    On CPU the copy bandwidth drifts with what else the machine is doing (12 to 35 GB/s within
    minutes on the shared test machine), so the fraction uses a large copy timed as one more
    provider in the same interleaved rounds (row provider ``copy``), per round; on CUDA the run's
    ``copy_gbs`` is stable enough.
    """
    paired_copy = device.type != "cuda" and bool(bytes_moved) and copy_gbs is not None
    if paired_copy:
        builders = {**builders, COPY: copy_builder(device)}
    timings, rows, notes = time_builders(op, size, builders, device, instance_bytes=instance_bytes,
                                         budget_s=budget_s, rounds=rounds, min_rounds=min_rounds, count=count)
    copy_timing = timings.pop(COPY, None)
    rows.extend(_derived_rows(op, size, timings, bytes_moved, copy_gbs, baseline, copy_timing,
                              2 * copy_buffer_bytes(device)))
    return rows, notes


def format_table(rows: list[dict]) -> str:
    """A plain-text table per (op, size) of the rows of one run (kernel and end-to-end subjects)."""
    groups: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    # Providers in the order they were timed (their median row), not the order notes arrived in.
    for r in sorted(rows, key=lambda r: r["metric"] != "median_ms"):
        groups.setdefault((r["op"], r["size"]), {}).setdefault(r["provider"], {})[r["metric"]] = r["value"]
    cols = [("median_ms", "ms", "{:.3f}"), ("spread", "spread", "{:.0%}"), ("gbps", "GB/s", "{:.1f}"),
            ("bw_fraction", "of copy", "{:.0%}"), ("launches", "launches", "{:.0f}"),
            ("speedup_vs_baseline", "x baseline", "{:.2f}"), ("speedup_vs_peer", "x peer", "{:.2f}"),
            ("images_per_s", "images/s", "{:.1f}"), ("ratio_to_sgd", "x SGD", "{:.2f}"),
            ("compile_s", "compile s", "{:.1f}")]
    out = []
    for (op, size), providers in groups.items():
        for m in providers.values():
            if "median_ms" in m and "p20_ms" in m and "p80_ms" in m and float(m["median_ms"]) > 0:
                m["spread"] = str((float(m["p80_ms"]) - float(m["p20_ms"])) / float(m["median_ms"]))
        used = [c for c in cols if any(c[0] in m for m in providers.values())]
        width = max(len(p) for p in providers) + 2
        out.append(f"\n{op}  [{size}]")
        out.append(" " * width + "".join(f"{h:>11}" for _, h, _ in used))
        for provider, m in providers.items():
            cells = []
            for key, _, f in used:
                cells.append(f"{f.format(float(m[key])):>11}" if key in m else f"{'-':>11}")
            out.append(f"{provider:<{width}}" + "".join(cells))
    return "\n".join(out)


def kernel_main(doc: str, measure: Callable, argv=None, default_sets=("resnet18",),
                choices: dict[str, tuple[str, ...]] | None = None) -> int:
    """Command line shared by the kernel subjects: ``python -m fastsam.bench.bench_<op> --set ...``.

    ``measure(set_name, device, *, budget_s, compile_, copy_gbs, **options) -> (rows, notes)``, with
    one ``--<option>`` per entry of ``choices`` (default: its first value).
    """
    import argparse

    from .param_sets import PARAM_SETS

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", choices=sorted(PARAM_SETS),
                    help=f"parameter set (repeatable; default {', '.join(default_sets)})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per set (CPU)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile providers")
    ap.add_argument("--out", default=None, help="CSV file, or directory for results.csv, to append to (default: "
                                                "bench/results/ inside the source tree, else the current directory)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    for option, values in (choices or {}).items():
        ap.add_argument(f"--{option}", choices=values, default=values[0])
    args = ap.parse_args(argv)
    options = {option: getattr(args, option) for option in (choices or {})}
    device = torch.device(args.device)
    note = configure_threads(device, args.threads)
    if note:
        print(note)
    copy_gbs, _ = copy_bandwidth(device)
    rows = [dict(op="copy", provider="torch", size="copy", metric="gbps", value=fmt(copy_gbs))]
    notes: list[str] = []
    for set_name in args.set or default_sets:
        r, n = measure(set_name, device, budget_s=args.budget, compile_=args.compile, copy_gbs=copy_gbs, **options)
        rows += r
        notes += n
    print(f"device: {device_name(device)}; copy bandwidth {copy_gbs:.1f} GB/s")
    print(format_table([r for r in rows if r["op"] != "copy"]))
    for n in notes:
        print("note:", n)
    path = append_rows([dict(r, device=device_name(device)) for r in rows], args.out)
    print(f"rows appended to {path}")
    return 0
