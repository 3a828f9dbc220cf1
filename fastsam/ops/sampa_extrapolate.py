"""SAMPa's extrapolation (Xie, Pethick & Cevher, "SAMPa: Sharpness-aware Minimization Parallelized",
NeurIPS 2024): the auxiliary point ``y_{t+1}`` one base-SGD step ahead along the last ``grad f(y_t)``.

Per element, with ``d`` the direction (``grad f(y_t)``) and ``buf`` SGD's momentum buffer (as the
authors' code: the step SGD would take with ``d``, without updating the buffer; math in fp32)::

    backup = w
    w      = w - lr * (d + weight_decay * w + momentum * buf)

``bufs`` may be empty (no momentum yet): the term is left out. ``restore_`` undoes the move.

Backends: ``torch`` (the reference; the only one for fp64), ``triton`` (``kernels/sampa_extrapolate.py``)
and ``cuda`` (``csrc/sampa_extrapolate.cu``): one pass, reading w, d (and buf) and writing w and the
backup, 16 fp32 bytes per element (20 with the buffers). ``directions`` and ``bufs`` are read-only.

Backend contract (``register("sampa_extrapolate", b)``): ``fn(params, directions, backups, bufs, lr,
momentum, weight_decay) -> None`` on one (device, dtype) bucket.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import is_low_precision, pack_fp32, unpack_into_


def sampa_extrapolate_(params, directions, backups, bufs=(), *, lr: float, momentum: float = 0.0,
                       weight_decay: float = 0.0, backend: str | None = "auto") -> None:
    """``backup = w; w -= lr * (d + weight_decay * w + momentum * buf)`` in place (see the module docstring)."""
    params, directions, backups, bufs = list(params), list(directions), list(backups), list(bufs)
    check_like_params(params, directions=directions, backups=backups, **({"bufs": bufs} if bufs else {}))
    for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    for (device, dtype), idx in group_by_device_dtype(params).items():
        _, fn = resolve("sampa_extrapolate", backend, device, dtype)
        fn([params[i] for i in idx], [directions[i] for i in idx], [backups[i] for i in idx],
           [bufs[i] for i in idx] if bufs else [], float(lr), float(momentum), float(weight_decay))


def _check_bucket(params, directions, backups, bufs) -> None:
    check_bucket("sampa_extrapolate", params, directions=directions, backups=backups, **({"bufs": bufs} if bufs else {}))


def _core(params, directions, bufs, lr, momentum, weight_decay):
    d = list(directions)  # read-only: each term below makes new tensors (d itself may be SAMPa's grad f(y))
    if weight_decay:
        d = torch._foreach_add(d, params, alpha=weight_decay)
    if bufs and momentum:
        d = torch._foreach_add(d, bufs, alpha=momentum)
    torch._foreach_add_(params, d, alpha=-lr)


@register("sampa_extrapolate", "torch")
def sampa_extrapolate_torch(params, directions, backups, bufs, lr, momentum, weight_decay) -> None:
    _check_bucket(params, directions, backups, bufs)
    if not params:
        return
    torch._foreach_copy_(backups, params)
    if not is_low_precision(params[0].dtype):
        _core(params, directions, bufs, lr, momentum, weight_decay)
        return
    w = [pack_fp32(params)]
    _core(w, [pack_fp32(directions)], [pack_fp32(bufs)] if bufs else [], lr, momentum, weight_decay)
    unpack_into_(params, w[0])


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/sampa_extrapolate.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("sampa_extrapolate", "cuda")
def sampa_extrapolate_cuda(params, directions, backups, bufs, lr, momentum, weight_decay) -> None:
    _check_bucket(params, directions, backups, bufs)
    if not params:
        return
    args = (params, directions, backups, list(bufs), float(lr), float(momentum), float(weight_decay))
    _cuda.call("sampa_extrapolate_", args, sampa_extrapolate_torch, args)


@_cuda.fake("sampa_extrapolate_")
def _sampa_extrapolate_fake(params, directions, backups, bufs, lr, momentum, weight_decay):
    return None


# --------------------------------------------------------------------------------------------
# triton backend (kernels/sampa_extrapolate.py)
# --------------------------------------------------------------------------------------------

@register("sampa_extrapolate", "triton")
def sampa_extrapolate_triton(params, directions, backups, bufs, lr, momentum, weight_decay) -> None:
    _check_bucket(params, directions, backups, bufs)
    from fastsam.kernels import sampa_extrapolate as kernels  # imported on first use: triton is optional

    kernels.sampa_extrapolate_entry(params, directions, backups, bufs, lr, momentum, weight_decay)
