"""Glue shared by the ``cuda`` backend sections of the op files.

The compiled extension (``csrc/binding.cpp``, imported as ``fastsam._C``) registers one operator per
op under ``torch.ops.fastsam_cuda``. Each op file's "cuda backend" section registers a Python
function with the dispatch registry that calls that operator, plus a fake implementation so that
``torch.compile`` can trace it.

[note: layout fallback]
The multi-tensor kernels walk each tensor's storage as one flat array, so every list of a call must
be dense with the parameter's strides (what autograd and ``torch.empty_like`` produce), and SWP
masks need row-major order. Anything else raises ``NotImplementedError`` tagged with
:data:`FALLBACK_TAG` before the first launch, and :func:`call` then runs the torch backend for that
bucket: ``auto`` stays silent and correct, and the common case pays nothing for the check.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastsam import _extension

NAMESPACE = "fastsam_cuda"
FALLBACK_TAG = "[fastsam:fallback]"

_ops: dict[str, object] = {}
_fakes: list[tuple[str, Callable]] = []
_registered: set[str] = set()


def status() -> tuple[bool, str]:
    """Load the extension if needed; (usable, reason if not). Registers the fakes once it is loaded."""
    ok, why = _extension.status()
    if ok:
        register_fakes()
    return ok, why


def library():
    """The loaded extension module, or None (:func:`status` says why)."""
    return _extension.load() if status()[0] else None


def op(name: str):
    """``torch.ops.fastsam_cuda.<name>``, looked up once (the fakes are registered by then)."""
    fn = _ops.get(name)
    if fn is None:
        if _extension.loaded():
            register_fakes()
        fn = _ops[name] = getattr(getattr(torch.ops, NAMESPACE), name)
    return fn


def call(name: str, args: tuple, fallback: Callable, fallback_args: tuple):
    """Run the compiled op; on a tagged layout rejection run ``fallback(*fallback_args)`` instead."""
    try:
        return op(name)(*args)
    except NotImplementedError as exc:
        if FALLBACK_TAG not in str(exc):
            raise
        return fallback(*fallback_args)


def fake(name: str) -> Callable[[Callable], Callable]:
    """Decorator: the fake (meta) implementation of ``fastsam_cuda::<name>`` for torch.compile.

    Registered once the extension is loaded: at import when it already is, otherwise when the op
    layer next asks for it (:func:`status`, :func:`op`).
    """

    def deco(fn: Callable) -> Callable:
        _fakes.append((name, fn))
        if _extension.loaded():
            register_fakes()
        return fn

    return deco


def register_fakes() -> None:
    """Register every fake implementation declared so far that is not registered yet."""
    for name, fn in _fakes:
        if name not in _registered:
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fn)
            _registered.add(name)


def to_int64(seed: int) -> int:
    """A 64-bit seed as the schema's signed ``int`` (the kernels reinterpret it as unsigned)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def lr_args(lr, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """The schema's ``(Tensor? lr_tensor, float lr)`` pair for a float or tensor learning rate."""
    if isinstance(lr, torch.Tensor):
        return lr.to(device=device, dtype=torch.float32, non_blocking=True), 0.0
    return None, float(lr)
