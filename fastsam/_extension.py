"""The optional compiled extension ``fastsam._C`` (CUDA kernels from ``csrc/``).

A missing or broken extension never breaks ``import fastsam``: the failure is recorded here,
``fastsam info`` prints it, and the Triton / torch backends serve instead.
"""

from __future__ import annotations

import importlib

_module = None
_reason: str | None = None


def load():
    """Import ``fastsam._C`` once; return the module or ``None`` (see :func:`status` for why)."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _module
    try:
        _module = importlib.import_module("fastsam._C")
    except ModuleNotFoundError:
        _reason = ("the CUDA extension fastsam._C is not built (it needs a CUDA build of torch and nvcc "
                   "at install time: `pip install --no-build-isolation -e .`)")
    except Exception as exc:  # built against another torch, missing CUDA runtime, ...
        _reason = f"the CUDA extension fastsam._C failed to load: {exc.__class__.__name__}: {exc}"
    return _module


def status() -> tuple[bool, str]:
    return (load() is not None), (_reason or "")
