"""GSAM's update direction, written over the perturbed-point gradient in place.

GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022). With ``g``
the gradient at ``w`` (first pass) and ``g_p`` the one at ``w + e`` (second pass), all over the whole
parameter set:

    c      = <g, g_p> / ||g_p||^2                 (0 when ||g_p|| = 0)
    g_perp = g - c * g_p                          (the part of g orthogonal to g_p)
    g_p    = g_p - alpha * g_perp  =  (1 + alpha c) g_p - alpha g

Descending along ``g_p`` minimises the perturbed loss; the ``- alpha * g_perp`` term lowers the
surrogate gap ``L(w + e) - L(w)`` without changing that first-order progress.

``stats`` is :func:`fastsam.ops.grad_dot`'s ``(<g, g_p>, ||g||^2, ||g_p||^2)`` over the whole
parameter set (all buckets, and all processes when sharded); ``c`` is computed from it on the
device. If any of the three sums is not finite (an inf/NaN gradient in either pass) the gradients
are left exactly as they are, decided on the device without a host sync: the step then falls back
to SAM's ``g_p``, whose own non-finite values ``GradScaler`` deals with as usual. Math in fp32;
per element this reads ``g_p`` and ``g`` and writes ``g_p`` (12 bytes in fp32).

Backend contract (``register("gsam_combine", backend)``): ``fn(grads, first_grads, stats, alpha)
-> None`` on one bucket, ``grads`` (the ``g_p``) updated in place; ``stats`` is fp32[3] on the
bucket's device, ``alpha`` a Python float.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bucket
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, add_scaled_or_skip_, is_low_precision, pack_fp32, scalar_dtype, unpack_into_
from .grad_dot import DOT, SQ_NORM_B, check_pairs


def check_alpha(alpha, name: str = "alpha") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {alpha!r}")


def check_stats(stats) -> None:
    if not isinstance(stats, torch.Tensor) or stats.shape != (3,) or not stats.is_floating_point():
        raise ValueError("stats must be the fp32[3] tensor returned by fastsam.ops.grad_dot, got "
                         f"{type(stats).__name__} {tuple(getattr(stats, 'shape', ()))}")


def gsam_coefficients(stats: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device scalars ``(1 + alpha c, -alpha, skip)`` for ``g_p <- (1 + alpha c) g_p - alpha g``.

    ``skip`` is fp32 1.0 when a sum is not finite; the first coefficient is then exactly 1.
    """
    stats = stats if stats.dtype == torch.float64 else stats.to(FP32)  # fp64 stats (fp64 weights) stay fp64
    sq_gp = stats[SQ_NORM_B]
    finite = torch.isfinite(stats).all()
    c = torch.where(sq_gp > 0, stats[DOT] / torch.where(sq_gp > 0, sq_gp, 1.0), 0.0)
    scale_gp = torch.where(finite, 1.0 + alpha * c, 1.0)
    minus_alpha = torch.full((), -float(alpha), dtype=stats.dtype, device=stats.device)
    return scale_gp, minus_alpha, (~finite).to(FP32)


def gsam_combine_(grads: list[torch.Tensor], first_grads: list[torch.Tensor], stats: torch.Tensor, alpha: float,
                  *, backend: str | None = "auto") -> None:
    """``grads <- grads - alpha * (first_grads - c * grads)`` in place (see module docstring)."""
    check_alpha(alpha)
    check_stats(stats)
    grads, first_grads = list(grads), list(first_grads)
    check_pairs(grads, first_grads, ("grads", "first_grads"))
    for (device, dtype), idx in group_by_device_dtype(grads).items():
        _, fn = resolve("gsam_combine", backend, device, dtype)
        fn([grads[i] for i in idx], [first_grads[i] for i in idx], stats.to(device, non_blocking=True),
           float(alpha))


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

@register("gsam_combine", "torch")
def gsam_combine_torch(grads, first_grads, stats, alpha) -> None:
    check_bucket("gsam_combine", grads, first_grads=first_grads)
    if not grads:
        return
    scale_gp, minus_alpha, skip = gsam_coefficients(stats.to(scalar_dtype(grads[0].dtype)), alpha)
    low = is_low_precision(grads[0].dtype)
    work = [pack_fp32(grads)] if low else grads
    firsts = [pack_fp32(first_grads)] if low else first_grads
    # Two passes over g_p: a scale (exactly 1 when skipping, so inf/NaN stay as they are), then the
    # "- alpha g" part through the device-flag skip (a plain add would turn 0 * inf into NaN).
    torch._foreach_mul_(work, scale_gp)
    add_scaled_or_skip_(work, firsts, minus_alpha, skip)
    if low:
        unpack_into_(grads, work[0])
