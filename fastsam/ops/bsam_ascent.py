"""bSAM's ascent step from the clean weights: ``w = backup + rho * d / s`` and ``h = sqrt(s) |g|``.

Bayesian SAM (Möllenhoff & Khan, ICLR 2023; the authors' ``optim.py``): with ``g`` the gradient at
the noisy weights and ``s`` the precision, the perturbed point is ``w + rho * g / s`` (``d = g``, or
``w^2 g`` with ``adaptive``, pytorch-optimizer's option), taken from the *clean* weights (the
backup); ``h = sqrt(s * g^2)`` is kept for the precision update after the second gradient.
Math in fp32 (fp64 for fp64 tensors).

Backend contract (``register("bsam_ascent", backend)``): ``fn(params, backups, grads, precisions,
scales, rho, adaptive) -> None`` on one bucket; writes ``params`` and ``scales`` (``h``).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import is_low_precision, pack_fp32, unpack_into_


def bsam_ascent_(params, backups, grads, precisions, scales, rho: float, adaptive: bool = False, *,
                 backend: str | None = "auto") -> None:
    """``params = backups + rho * d / precisions``; ``scales = sqrt(precisions) * |grads|``."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    params, backups, grads, precisions, scales = map(list, (params, backups, grads, precisions, scales))
    check_like_params(params, backups=backups, grads=grads, precisions=precisions, scales=scales)
    for (device, dtype), idx in group_by_device_dtype(params).items():
        _, fn = resolve("bsam_ascent", backend, device, dtype)
        fn(*([lst[i] for i in idx] for lst in (params, backups, grads, precisions, scales)), float(rho),
           bool(adaptive))


@register("bsam_ascent", "torch")
def bsam_ascent_torch(params, backups, grads, precisions, scales, rho, adaptive) -> None:
    check_bucket("bsam_ascent", params, backups=backups, grads=grads, precisions=precisions, scales=scales)
    if not params:
        return
    low = is_low_precision(params[0].dtype)
    w0, g, s = ([pack_fp32(x)] if low else x for x in (backups, grads, precisions))
    d = torch._foreach_mul(g, rho)
    if adaptive:
        torch._foreach_mul_(d, torch._foreach_mul(w0, w0))
    torch._foreach_div_(d, s)
    torch._foreach_add_(d, w0)  # backup + rho d / s
    h = torch._foreach_sqrt(s)
    torch._foreach_mul_(h, torch._foreach_abs(g))
    if low:
        unpack_into_(params, d[0])
        unpack_into_(scales, h[0])
    else:
        torch._foreach_copy_(params, d)
        torch._foreach_copy_(scales, h)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/bsam_ascent.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("bsam_ascent", "cuda")
def bsam_ascent_cuda(params, backups, grads, precisions, scales, rho, adaptive) -> None:
    if not params:
        return
    args = (params, backups, grads, precisions, scales, float(rho), bool(adaptive))
    _cuda.call("bsam_ascent_", args, bsam_ascent_torch, args)


@_cuda.fake("bsam_ascent_")
def _bsam_ascent_fake(params, backups, grads, precisions, scales, rho, adaptive):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("bsam_ascent", "triton")
def bsam_ascent_triton(params, backups, grads, precisions, scales, rho, adaptive) -> None:
    check_bucket("bsam_ascent", params, backups=backups, grads=grads, precisions=precisions, scales=scales)
    from fastsam.kernels import bsam_ascent as kernels  # imported on first use: triton is optional

    kernels.bsam_ascent_entry(params, backups, grads, precisions, scales, rho, adaptive)
