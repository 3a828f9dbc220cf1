"""The optional compiled extension ``fastsam._C`` (CUDA kernels from ``csrc/``).

A missing or broken extension never breaks ``import fastsam``: the failure is recorded here,
``fastsam info`` prints it, and the Triton / torch backends serve instead.

Where it comes from, first match wins:

* ``fastsam._C``, built by ``setup.py`` (``pip install --no-build-isolation -e .`` with a CUDA build of
  torch and a CUDA toolkit of the same major version);
* a JIT build of the source tree's ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja), for
  editable installs: opt in with ``FASTSAM_CUDA_JIT=1`` (built on first use, cached by torch under
  ``TORCH_EXTENSIONS_DIR``) or call :func:`build_jit` explicitly.

Loading is lazy: it happens the first time a backend's availability is asked (the first
``backend="auto"`` resolution on a CUDA device, or ``fastsam info``), not at ``import fastsam``.

This module only loads the library and reports on it; it knows nothing of the op layer. The op
layer (``fastsam/ops/_cuda_common.py``) asks it for the library, registers its own fake
implementations, and watches :data:`generation` to drop dispatch decisions taken before a load.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# Must equal kAbiVersion in csrc/launchers.h: a build from other sources is refused, not half-used.
ABI_VERSION = 4
JIT_ENV = "FASTSAM_CUDA_JIT"
JIT_NAME = "fastsam_cuda_jit"

_module = None
_reason: str | None = None
# Bumped whenever the load result changes (a load, a JIT build): callers that cache decisions based
# on the extension's availability compare it with the value they saw.
generation = 0


def source_dir() -> Path:
    """``csrc/`` of the source tree this package was imported from (exists for editable installs)."""
    return Path(__file__).resolve().parent.parent / "csrc"


def _jit_requested() -> bool:
    return os.environ.get(JIT_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def _loaded_abi() -> int:
    import torch

    return int(torch.ops.fastsam_cuda.abi_version())


def _accept(module) -> None:
    """Check the ABI of a freshly imported extension and take it (or record why not)."""
    global _module, _reason, generation
    generation += 1
    try:
        abi = _loaded_abi()
    except Exception as exc:
        _module = None
        _reason = f"the CUDA extension loaded but its operators are missing ({exc.__class__.__name__}: {exc})"
        return
    if abi != ABI_VERSION:
        _module, _reason = None, (f"the CUDA extension was built from other sources (ABI {abi}, this fastsam expects "
                                  f"{ABI_VERSION}); rebuild it: `pip install --no-build-isolation -e .`")
        return
    _module, _reason = module, None


def load():
    """Load the extension once; return the module or ``None`` (see :func:`status` for why)."""
    global _reason
    if _module is not None or _reason is not None:
        return _module
    try:
        module = importlib.import_module("fastsam._C")
    except ModuleNotFoundError as exc:
        if exc.name != "fastsam._C":
            _reason = f"the CUDA extension fastsam._C failed to load: {exc.__class__.__name__}: {exc}"
            return None
        if _jit_requested():
            return build_jit()
        _reason = ("the CUDA extension fastsam._C is not built (it needs a CUDA build of torch and nvcc at install "
                   "time: `pip install --no-build-isolation -e .`, or set FASTSAM_CUDA_JIT=1 to compile it on first "
                   "use)")
        return None
    except Exception as exc:  # built against another torch, missing CUDA runtime, ...
        _reason = f"the CUDA extension fastsam._C failed to load: {exc.__class__.__name__}: {exc}"
        return None
    _accept(module)
    return _module


def build_jit(verbose: bool = False):
    """Compile ``csrc/`` now with ``torch.utils.cpp_extension.load`` and use the result.

    Honours ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` like any torch extension build. Returns the
    module, or ``None`` with the reason in :func:`status`.
    """
    global _module, _reason
    if _module is not None:
        return _module
    src = source_dir()
    sources = sorted(str(p) for p in src.glob("*.cu")) + sorted(str(p) for p in src.glob("*.cpp"))
    if not sources:
        _reason = f"a JIT build needs the source tree's csrc/ (not found at {src}; use an editable install)"
        return None
    try:
        import torch
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            raise RuntimeError("this torch build has no CUDA support")
        module = cpp_extension.load(name=JIT_NAME, sources=sources, extra_include_paths=[str(src)],
                                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], verbose=verbose)
    except Exception as exc:
        _module, _reason = None, f"the JIT build of the CUDA extension failed: {exc.__class__.__name__}: {exc}"
        return None
    _accept(module)
    return _module


def loaded() -> bool:
    """Whether the extension is loaded already (never triggers a load)."""
    return _module is not None


def status() -> tuple[bool, str]:
    return (load() is not None), (_reason or "")


_device_checks: dict[tuple[int, int], tuple[bool, str]] = {}


def device_status(index: int) -> tuple[bool, str]:
    """Whether the loaded extension carries code GPU ``index`` runs (see fastsam/_fatbin.py's note).

    Checked on the first CUDA use of each GPU, whatever ran before (a CPU-only call included), so a
    build for another architecture falls back instead of failing at its first launch.
    """
    key = (generation, index)
    hit = _device_checks.get(key)
    if hit is None:
        import torch

        from fastsam import _fatbin

        major, minor = torch.cuda.get_device_capability(index)
        path = getattr(_module, "__file__", None)
        why = _fatbin.incompatibility(path, major, minor) if path else None
        hit = _device_checks[key] = (not why, why or "")
    return hit
