"""LookSAM's two element-wise passes: store the orthogonal component, then reuse it.

LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022)
takes a full SAM step only every ``k`` steps. With ``g`` the gradient at ``w`` and ``g_s`` the SAM
gradient (at ``w + e``), all over the whole parameter set:

* :func:`looksam_orthogonal_` (on the SAM steps): the part of ``g_s`` orthogonal to ``g``,

      g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||  =  g_s - (<g, g_s> / ||g||^2) g

  (the ``g`` term is dropped when ``||g|| = 0``), written into ``gv`` and returned with its squared
  norm. ``stats`` is :func:`fastsam.ops.grad_dot`'s ``(<g, g_s>, ||g||^2, ||g_s||^2)``. ``gv`` may be
  the very tensors of ``first_grads`` (computed in place), which saves a buffer. Per element: read
  ``g_s`` and ``g``, write ``g_v`` (12 bytes in fp32).
* :func:`looksam_combine_` (on the ``k - 1`` steps in between, one forward/backward each): with ``g``
  the current gradient,

      g = g + alpha * (||g|| / ||g_v||) * g_v

  in place (no change when ``||g_v|| = 0``). ``sq_norm_g`` is the squared norm of the current
  gradient over the whole parameter set (:func:`fastsam.ops.grad_sq_norm`) and ``sq_norm_gv`` the
  value :func:`looksam_orthogonal_` returned. If either is not finite the gradients are left exactly
  as they are, decided on the device (a SAM step with an inf/NaN gradient stores a non-finite
  ``g_v``; the steps after it then take the plain gradient until the next SAM step recomputes it).
  Per element: read ``g`` and ``g_v``, write ``g`` (12 bytes in fp32).

All math in fp32; scalars are read on the device, never on the host.

Backend contracts:
``register("looksam_orthogonal", b)``: ``fn(gv, sam_grads, first_grads, stats) -> Tensor`` on one
bucket; writes ``gv`` (which may alias ``first_grads``) and returns the squared norm of ``gv`` *as
stored* (after rounding to its dtype), a 0-dim fp32 tensor on the bucket's device; partial norms
add across buckets. ``register("looksam_combine", b)``: ``fn(grads, gv, sq_norm_g, sq_norm_gv,
alpha) -> None`` on one bucket, the norms 0-dim fp32 on the bucket's device, ``alpha`` a float.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, mixed_precision_total
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import (FP32, add_scaled_or_skip_, as_device_scalar, is_low_precision, pack_fp32,
                            scalar_dtype, unpack_into_)
from .grad_dot import DOT, SQ_NORM_A, check_pairs, sum_sq_norms
from .gsam_combine import check_alpha, check_stats


def looksam_orthogonal_(gv: list[torch.Tensor], sam_grads: list[torch.Tensor], first_grads: list[torch.Tensor],
                        stats: torch.Tensor, *, backend: str | None = "auto") -> torch.Tensor:
    """``gv = sam_grads - (<g, g_s>/||g||^2) first_grads``; returns ``||gv||^2`` (fp32, on ``gv[0]``'s device)."""
    check_stats(stats)
    gv, sam_grads, first_grads = list(gv), list(sam_grads), list(first_grads)
    if not gv:
        raise ValueError("looksam_orthogonal_ needs at least one tensor")
    check_pairs(gv, sam_grads, ("gv", "sam_grads"))
    check_pairs(gv, first_grads, ("gv", "first_grads"))
    out_device = gv[0].device
    total = None
    for (device, dtype), idx in group_by_device_dtype(gv).items():
        _, fn = resolve("looksam_orthogonal", backend, device, dtype)
        part = fn([gv[i] for i in idx], [sam_grads[i] for i in idx], [first_grads[i] for i in idx],
                  stats.to(device, non_blocking=True)).to(out_device, non_blocking=True)
        total = part if total is None else total + part
    return mixed_precision_total(total, gv)


def looksam_combine_(grads: list[torch.Tensor], gv: list[torch.Tensor], sq_norm_g: torch.Tensor,
                     sq_norm_gv: torch.Tensor, alpha: float, *, backend: str | None = "auto") -> None:
    """``grads += alpha * (||g|| / ||g_v||) * gv`` in place (see module docstring)."""
    check_alpha(alpha)
    for name, t in (("sq_norm_g", sq_norm_g), ("sq_norm_gv", sq_norm_gv)):
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            raise ValueError(f"{name} must be a one-element tensor (a squared norm left on the device)")
    grads, gv = list(grads), list(gv)
    check_pairs(grads, gv, ("grads", "gv"))
    for (device, dtype), idx in group_by_device_dtype(grads).items():
        _, fn = resolve("looksam_combine", backend, device, dtype)
        acc = scalar_dtype(dtype)
        fn([grads[i] for i in idx], [gv[i] for i in idx], as_device_scalar(sq_norm_g, device, acc),
           as_device_scalar(sq_norm_gv, device, acc), float(alpha))


def looksam_projection(stats: torch.Tensor) -> torch.Tensor:
    """``<g, g_s> / ||g||^2`` as a device scalar (0 when ``||g|| = 0``)."""
    stats = stats if stats.dtype == torch.float64 else stats.to(FP32)  # fp64 stats (fp64 weights) stay fp64
    sq_g = stats[SQ_NORM_A]
    return torch.where(sq_g > 0, stats[DOT] / torch.where(sq_g > 0, sq_g, 1.0), 0.0)


def looksam_scale(sq_norm_g: torch.Tensor, sq_norm_gv: torch.Tensor, alpha: float):
    """Device scalars ``(alpha ||g|| / ||g_v||, skip)``; the scale is 0 when ``||g_v|| = 0`` or skipping."""
    finite = torch.isfinite(sq_norm_g) & torch.isfinite(sq_norm_gv)
    use = finite & (sq_norm_gv > 0)
    scale = alpha * torch.sqrt(torch.where(use, sq_norm_g, 0.0) / torch.where(use, sq_norm_gv, 1.0))
    return torch.where(use, scale, 0.0), (~finite).to(FP32)


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

@register("looksam_orthogonal", "torch")
def looksam_orthogonal_torch(gv, sam_grads, first_grads, stats) -> torch.Tensor:
    check_bucket("looksam_orthogonal", gv, sam_grads=sam_grads, first_grads=first_grads)
    if not gv:
        return torch.zeros((), dtype=FP32)
    minus_c = -looksam_projection(stats.to(scalar_dtype(gv[0].dtype)))
    if is_low_precision(gv[0].dtype):
        flat = pack_fp32(first_grads)
        flat.mul_(minus_c).add_(pack_fp32(sam_grads))
        unpack_into_(gv, flat)
    else:
        if any(v is not g for v, g in zip(gv, first_grads)):
            torch._foreach_copy_(gv, first_grads)
        # gv holds g here; -c g + g_s in place, so gv may be first_grads itself.
        torch._foreach_mul_(gv, minus_c)
        torch._foreach_add_(gv, sam_grads)
    return sum_sq_norms(gv)


@register("looksam_combine", "torch")
def looksam_combine_torch(grads, gv, sq_norm_g, sq_norm_gv, alpha) -> None:
    check_bucket("looksam_combine", grads, gv=gv)
    if not grads:
        return
    acc = scalar_dtype(grads[0].dtype)
    scale, skip = looksam_scale(sq_norm_g.to(acc), sq_norm_gv.to(acc), alpha)
    low = is_low_precision(grads[0].dtype)
    work = [pack_fp32(grads)] if low else grads
    add_scaled_or_skip_(work, [pack_fp32(gv)] if low else gv, scale, skip)
    if low:
        unpack_into_(grads, work[0])
