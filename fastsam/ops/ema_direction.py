"""FriendlySAM's perturbation direction fused with its gradient EMA, in place.

FriendlySAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024) removes the
full-batch component of the gradient from the perturbation direction, estimating it by an
exponential moving average ``m`` of past first-pass gradients. Per element, with ``g`` the
first-pass gradient:

    d = g - sigma * m                     (the direction, written over g)
    m = lmbda * m + (1 - lmbda) * g       (the EMA, with the raw g; computed as m + (1 - lmbda)(g - m),
                                           torch's ``lerp``, as the peers do)

One pass reads g and m and writes both (16 fp32 bytes per element). The first step of a run has no
EMA yet; the optimizer then initialises ``m`` with a copy of ``g`` (and ``d = g``), as the authors'
code does. ``skip`` (optional 0-dim device flag, non-zero = skip) leaves
both lists untouched, so that a non-finite gradient (an fp16 overflow) never enters the EMA; it is
decided on the device, no host sync. Math in fp32 (fp64 for fp64 tensors in the torch backend).

Backend contract (``register("ema_direction", backend)``): ``fn(grads, momenta, sigma, lmbda, skip)
-> None`` on one bucket; ``sigma``, ``lmbda`` Python floats, ``skip`` a 0-dim fp32 tensor on the
bucket's device or None.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, add_scaled_or_skip_, as_device_scalar, is_low_precision
from .grad_mix import check_skip, pack, unpack_into_


def check_ema_args(sigma, lmbda) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0 <= lmbda <= 1:
        raise ValueError(f"lmbda (the EMA factor) must be in [0, 1], got {lmbda!r}")


def ema_direction_(grads: list[torch.Tensor], momenta: list[torch.Tensor], sigma: float, lmbda: float, *,
                   skip: torch.Tensor | None = None, backend: str | None = "auto") -> None:
    """``grads <- grads - sigma momenta; momenta <- lmbda momenta + (1 - lmbda) grads_old`` in place."""
    check_ema_args(sigma, lmbda)
    check_skip(skip)
    grads, momenta = list(grads), list(momenta)
    check_like_params(grads, momenta=momenta)
    for (device, dtype), idx in group_by_device_dtype(grads).items():
        _, fn = resolve("ema_direction", backend, device, dtype)
        fn([grads[i] for i in idx], [momenta[i] for i in idx], float(sigma), float(lmbda),
           None if skip is None else as_device_scalar(skip, device))


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

@register("ema_direction", "torch")
def ema_direction_torch(grads, momenta, sigma, lmbda, skip) -> None:
    check_bucket("ema_direction", grads, momenta=momenta)
    if not grads:
        return
    if is_low_precision(grads[0].dtype):
        _ema_direction_flat(grads, momenta, sigma, lmbda, skip)
        return
    # fp32/fp64: _foreach_* increments, applied through the fused skip (see grad_mix's note):
    # g += -sigma m and m += (1 - lmbda) (g - m), the EMA in torch's lerp form.
    dg = torch._foreach_mul(momenta, -sigma)
    dm = torch._foreach_sub(grads, momenta)
    torch._foreach_mul_(dm, 1.0 - lmbda)
    if skip is None:
        torch._foreach_add_(grads, dg)
        torch._foreach_add_(momenta, dm)
        return
    one = torch.ones((), dtype=FP32, device=grads[0].device)
    add_scaled_or_skip_(grads, dg, one, skip.to(FP32))
    add_scaled_or_skip_(momenta, dm, one, skip.to(FP32))


def _ema_direction_flat(grads, momenta, sigma, lmbda, skip) -> None:
    g, m = pack(grads), pack(momenta)  # flat fp32 copies (see _torch_common's note on fp32 math)
    d = g - sigma * m
    m_new = m + (1.0 - lmbda) * (g - m)
    if skip is not None:
        keep = skip == 0
        d, m_new = torch.where(keep, d, g), torch.where(keep, m_new, m)
    unpack_into_(grads, d)
    unpack_into_(momenta, m_new)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/ema_direction.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("ema_direction", "cuda")
def ema_direction_cuda(grads, momenta, sigma, lmbda, skip) -> None:
    if not grads:
        return
    _cuda.call("ema_direction_", (grads, momenta, float(sigma), float(lmbda), skip), ema_direction_torch,
               (grads, momenta, sigma, lmbda, skip))


@_cuda.fake("ema_direction_")
def _ema_direction_fake(grads, momenta, sigma, lmbda, skip):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("ema_direction", "triton")
def ema_direction_triton(grads, momenta, sigma, lmbda, skip) -> None:
    check_bucket("ema_direction", grads, momenta=momenta)
    from fastsam.kernels import ema_direction as kernels  # imported on first use: triton is optional

    kernels.ema_direction_entry(grads, momenta, sigma, lmbda, skip)
