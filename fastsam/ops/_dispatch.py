"""Backend registry shared by every fastsam op.

[note: dispatch]
Each op (``grad_norm``, ``perturb``, ``restore``, ...) has one Python signature, documented in its
file under ``fastsam/ops/``, and one implementation per backend registered here with
:func:`register`. Backends:

* ``torch``  - pure PyTorch (``torch._foreach_*`` and torch's own fused optimizer kernels). Always
  present, runs on every device, and is the reference the other backends are tested against.
* ``triton`` - fused multi-tensor Triton kernels (``fastsam.kernels``). CUDA tensors, or CPU
  tensors when ``TRITON_INTERPRET=1`` (how CI tests them).
* ``cuda``   - the compiled extension ``fastsam._C`` (sources in ``csrc/``). CUDA tensors only.

Implementations are called per *bucket*: a list of tensors sharing one device and one dtype.
Splitting a user's tensor lists into buckets is the op's public wrapper's job (and the
optimizer's, which caches it), so kernels never see mixed lists.

Choosing a backend: ``backend="auto"`` takes the first backend of the auto order that can run the
bucket (device, dtype, op registered), silently falling back to ``torch``. An explicit backend
that cannot run raises :class:`BackendUnavailableError` naming the reason. The environment
variable ``FASTSAM_BACKEND`` replaces ``"auto"`` (an explicit constructor argument wins over it,
so that code which asks for the reference backend keeps it).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from fastsam import _extension

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "FASTSAM_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)

_registry: dict[str, dict[str, Callable]] = {}

# Auto order per (op, device type). The defaults put the compiled kernels first on CUDA; a table
# of measured winners (see ``set_auto_order`` and ``_autotune.py``) replaces them per op once
# benchmarks exist.
_DEFAULT_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch")}
_auto_order: dict[tuple[str, str], tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the requested op on these tensors."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        _resolved.clear()
        return fn

    return deco


def implementations(op: str) -> dict[str, Callable]:
    return dict(_registry.get(op, {}))


def set_auto_order(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Set the ``auto`` preference for one op on one device type (used by measured tables)."""
    bad = [b for b in order if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backends {bad}")
    _auto_order[(op, device_type)] = tuple(order)
    _resolved.clear()


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    order = _auto_order.get((op, device_type)) or _DEFAULT_AUTO_ORDER.get(device_type, ())
    return tuple(order) + (() if "torch" in order else ("torch",))


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_status_cache: dict[str, tuple[bool, str]] = {}
_seen_generation = _extension.generation  # of the extension's load state the caches were filled under


def backend_status(backend: str) -> tuple[bool, str]:
    """(usable at all, reason if not) for a backend, independent of any particular tensor."""
    if backend not in BACKENDS:
        return False, f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'"
    if backend == "torch":
        return True, ""
    if backend in _status_cache:
        return _status_cache[backend]
    if backend == "triton":
        try:
            importlib.import_module("triton")
            importlib.import_module("fastsam.kernels")
        except Exception as exc:  # ImportError, or a broken install
            status = (False, f"triton is not importable ({exc.__class__.__name__}: {exc}); "
                             "install it with `pip install 'fastsam[triton]'`")
        else:
            if torch.cuda.is_available() or triton_interpreter_enabled():
                status = (True, "")
            else:
                status = (False, "no CUDA device, and the Triton interpreter is off "
                                 "(set TRITON_INTERPRET=1 before triton is imported to run on CPU)")
    else:  # cuda
        from . import _cuda_common

        ok, why = _cuda_common.status()
        if ok and not torch.cuda.is_available():
            ok, why = False, "the extension is built but no CUDA device is visible"
        status = (ok, why)
    _status_cache[backend] = status
    return status


def supports(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Can ``backend`` run ``op`` on a bucket of ``dtype`` tensors on ``device``? (ok, reason)."""
    ok, why = backend_status(backend)
    if not ok:
        return False, why
    if backend not in _registry.get(op, {}):
        return False, f"the {backend} backend has no implementation of {op}"
    if backend == "torch":
        if dtype not in TORCH_DTYPES:
            return False, f"dtype {dtype} is not supported (floating point only)"
        return True, ""
    if dtype not in KERNEL_DTYPES:
        return False, f"dtype {dtype} is not supported by the {backend} kernels (fp32, fp16, bf16)"
    if backend == "triton":
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "no CUDA device is visible"
            return True, ""
        if device.type == "cpu" and triton_interpreter_enabled():
            return True, ""
        return False, (f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                       f"not on {device.type}")
    if device.type != "cuda":
        return False, f"the CUDA extension runs on CUDA tensors, not on {device.type}"
    from fastsam import _extension  # the build's architectures against this GPU's, once per GPU

    return _extension.device_status(device.index if device.index is not None else torch.cuda.current_device())


def requested_backend(backend: str | None) -> str:
    """Normalise a user's backend argument (``None``/``"auto"`` honour ``FASTSAM_BACKEND``)."""
    name = (backend or "auto").strip().lower()
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env != "auto" and env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not a backend; expected one of {BACKENDS} or 'auto'")
            name = env
    elif name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return name


def check_backend(backend: str | None) -> str:
    """Validate a backend argument up front (constructors call this): raise if it can never run."""
    name = requested_backend(backend)
    if name != "auto":
        ok, why = backend_status(name)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")
    return name


_resolved: dict[tuple, tuple[str, Callable]] = {}


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for one bucket. Returns (backend name, function).

    ``backend`` is ``"auto"``/``None`` (``FASTSAM_BACKEND`` applies) or a backend name. Results are
    cached, so calling this once per bucket per step costs a dictionary lookup.
    """
    if _seen_generation != _extension.generation:  # the extension was (re)loaded since: decide afresh
        clear_caches()
    name = requested_backend(backend) if backend in (None, "auto") else backend
    key = (op, name, device, dtype)
    hit = _resolved.get(key)
    if hit is not None:
        return hit
    impls = _registry.get(op)
    if not impls:
        raise KeyError(f"no op named {op!r} is registered")
    if name == "auto":
        if device.type == "cuda":
            from . import _autotune  # measured orders (table or opt-in probe), applied once per process

            _autotune.ensure_measured_order(device)
        for candidate in auto_order(op, device.type):
            if supports(candidate, op, device, dtype)[0]:
                _resolved[key] = (candidate, impls[candidate])
                return _resolved[key]
        ok, why = supports("torch", op, device, dtype)
        raise BackendUnavailableError(f"no backend can run {op} on {device.type}/{dtype}: {why}")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    ok, why = supports(name, op, device, dtype)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device.type} {dtype} tensors: {why}")
    _resolved[key] = (name, impls[name])
    return _resolved[key]


def clear_caches() -> None:
    """Forget availability and resolution results (tests toggling backends use this)."""
    global _seen_generation
    _status_cache.clear()
    _resolved.clear()
    _seen_generation = _extension.generation


def group_by_device_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups
