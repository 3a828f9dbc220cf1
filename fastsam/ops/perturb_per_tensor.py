"""Perturb each tensor along its gradient by its own scale, keeping a backup for the restore.

For tensor ``t`` of the list, with ``s_t = scales[t]`` read on the device:

    backup_t = w_t;   w_t = w_t + s_t * g_t

This is the layer-wise perturbation of AWP (Wu et al., NeurIPS 2020; WT-AWP, Wu et al., AAAI 2023):
with ``s_t = rho ||w_t|| / (||g_t|| + eps)`` (both norms from
:func:`fastsam.ops.per_tensor_norm`) every layer moves by ``rho`` times its own weight norm, and a
layer that must never be perturbed (WT-AWP's truncation) simply gets ``s_t = 0``.

A tensor whose scale is not finite (inf/NaN) keeps its weights bit-for-bit (its backup is still
written), decided on the device: the caller turns a non-finite gradient into NaN scales and the
step stays free of host synchronisation. (``s_t = 0`` with a non-finite ``g_t`` would give NaN
weights, so a caller must not rely on a zero scale to skip a non-finite gradient.)

Backend contract (``register("perturb_per_tensor", backend)``): ``fn(params, grads, backups,
scales) -> None`` on one bucket (one device, one dtype, no empty tensor); ``scales`` is fp32 (fp64 for
an fp64 bucket) of length ``len(params)`` on the bucket's device; all math in fp32; a constant number of launches.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, is_low_precision


def perturb_per_tensor_(params: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
                        scales: torch.Tensor, *, backend: str | None = "auto") -> None:
    """``backups[t].copy_(params[t]); params[t] += scales[t] * grads[t]`` for every t, in place."""
    params, grads, backups = list(params), list(grads), list(backups)
    if not params:
        return
    check_like_params(params, grads=grads, backups=backups)
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or scales.numel() != len(params):
        raise ValueError(f"scales must be a 1-D tensor with one entry per parameter ({len(params)}), got "
                         f"{tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
    if not scales.is_floating_point():
        raise TypeError(f"scales must be floating point, got {scales.dtype}")
    groups = group_by_device_dtype(params)
    if len(groups) == 1 and all(p.numel() for p in params):  # the usual case: one bucket, nothing empty
        (device, dtype), _ = next(iter(groups.items()))
        _, fn = resolve("perturb_per_tensor", backend, device, dtype)
        fn(params, grads, backups, scales.to(device=device, dtype=_scale_dtype(dtype), non_blocking=True))
        return
    fns = {key: resolve("perturb_per_tensor", backend, *key)[1] for key in groups}  # all before any write
    for (device, dtype), idx in groups.items():
        idx = [i for i in idx if params[i].numel()]
        if not idx:
            continue
        s = scales.to(device=device, dtype=_scale_dtype(dtype), non_blocking=True)[torch.tensor(idx, device=device)]
        fns[(device, dtype)]([params[i] for i in idx], [grads[i] for i in idx], [backups[i] for i in idx], s)


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else FP32


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

_counts: dict[tuple, torch.Tensor] = {}


def _numels_tensor(params, device) -> torch.Tensor:
    key = (device, tuple(p.numel() for p in params))
    hit = _counts.get(key)
    if hit is None:
        hit = _counts[key] = torch.tensor(key[1], dtype=torch.int64, device=device)
        if len(_counts) > 64:
            _counts.pop(next(iter(_counts)))
    return hit


@register("perturb_per_tensor", "torch")
def perturb_per_tensor_torch(params, grads, backups, scales) -> None:
    """The reference: the whole bucket as one flat vector (a constant number of ops for any T).

    fp32 math (fp64 for fp64 buckets), one rounding back to the storage dtype; a tensor whose scale
    is not finite gets its own value written back, which is exact (fp16/bf16/fp32 -> fp32 -> back).
    """
    check_bucket("perturb_per_tensor", params, grads=grads, backups=backups)
    if not params:
        return
    device = params[0].device
    torch._foreach_copy_(backups, params)
    work = torch.float64 if params[0].dtype == torch.float64 else FP32
    w = torch.cat([p.reshape(-1) for p in params]).to(work)
    g = torch.cat([x.reshape(-1) for x in grads]).to(work)
    s = scales.to(device=device, dtype=work)
    per_elem = torch.repeat_interleave(s, _numels_tensor(params, device), output_size=w.numel())
    moved = torch.where(torch.isfinite(per_elem), w + per_elem * g, w)
    if is_low_precision(params[0].dtype) or moved.dtype != params[0].dtype:
        moved = moved.to(params[0].dtype)
    views, start = [], 0
    for p in params:
        n = p.numel()
        views.append(moved[start:start + n].view(p.shape))
        start += n
    torch._foreach_copy_(params, views)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/perturb_per_tensor.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("perturb_per_tensor", "cuda")
def perturb_per_tensor_cuda(params, grads, backups, scales) -> None:
    _cuda.call("perturb_per_tensor_", (list(params), list(grads), list(backups), scales),
               perturb_per_tensor_torch, (params, grads, backups, scales))


@_cuda.fake("perturb_per_tensor_")
def _perturb_per_tensor_fake(params, grads, backups, scales):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("perturb_per_tensor", "triton")
def perturb_per_tensor_triton(params, grads, backups, scales) -> None:
    check_bucket("perturb_per_tensor", params, grads=grads, backups=backups)
    from fastsam.kernels import perturb_per_tensor as kernels  # imported on first use: triton is optional

    kernels.perturb_per_tensor_entry(params, grads, backups, scales)
