"""Helpers shared by the pure-torch backend implementations.

[note: fp32 math in the torch backend]
Every backend computes in fp32 whatever the storage dtype. For fp32 (and fp64) buckets the torch
backend works on the tensor lists directly with ``torch._foreach_*``. For fp16/bf16 buckets it
packs each list into one flat fp32 tensor (one ``cat`` and one cast: a constant number of kernels,
whatever the number of tensors), runs the same fp32 code on the one-element list, and writes the
results back with a single rounding. That costs extra memory traffic, which is fine for the
reference backend; the Triton and CUDA kernels load low-precision values and convert in registers.

[note: skipping a step without a host sync]
A non-finite gradient must leave the weights untouched, and the decision must stay on the device.
Element-wise arithmetic cannot do that (``w + 0 * inf`` is NaN), so the torch backend applies
``w += s * d`` through torch's fused SGD kernel (``torch._fused_sgd_`` with ``lr = -s``), which
reads a device-side ``found_inf`` flag and returns early when it is set, exactly as torch's own
optimizers do under ``GradScaler``. Devices without fused kernels fall back to a per-tensor
``torch.where`` (correct, but one launch per tensor).
"""

from __future__ import annotations

import torch

FP32 = torch.float32

try:  # private but stable since torch 2.2: the devices with fused optimizer kernels
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except Exception:  # pragma: no cover - very old or unusual builds
    _FUSED_DEVICES = frozenset({"cpu", "cuda"})


def has_fused_kernels(device: torch.device, dtype: torch.dtype, kind: str = "sgd") -> bool:
    """Whether torch's fused ``kind`` ("sgd" or "adamw") kernel can serve this (device, dtype).

    Never inside ``torch.compile``: the fused kernels have no meta implementation for every overload,
    and inductor fuses the plain foreach/where path into one kernel per tensor anyway.

    [note: torch's CPU fused SGD and half precision]
    In torch 2.12-2.13 the CPU ``_fused_sgd_`` kernel silently skips or corrupts the vectorised part
    of fp16/bf16 updates (pytorch/pytorch#191763, fixed upstream by #192545; fp32 and the CPU fused
    AdamW are fine). The torch backend therefore sends half-precision CPU buckets through the packed
    fp32 path; ``tests/test_restore_sgd_step.py`` would catch a regression either way.
    """
    if device.type not in _FUSED_DEVICES or torch.compiler.is_compiling():
        return False
    if dtype == torch.float64:
        return device.type == "cpu"
    if dtype == torch.float32:
        return True
    if dtype in (torch.float16, torch.bfloat16):
        return not (device.type == "cpu" and kind == "sgd")
    return False


def fused_layouts_ok(*lists) -> bool:
    """Whether torch's fused kernels may walk these parallel tensor lists in memory order.

    They assume that the i-th tensors of every list share one dense layout (the CPU kernels walk
    raw memory); a transposed parameter with a contiguous gradient would be updated at the wrong
    elements. Autograd normally gives gradients their parameter's layout, but nothing guarantees it.
    """
    if all(t.is_contiguous() for ts in lists for t in ts):  # the common case, one cheap call per tensor
        return True
    for ts in zip(*lists):
        first = ts[0]
        if not _dense(first):
            return False
        stride = first.stride()
        for t in ts[1:]:
            if t.stride() != stride:
                return False
    return True


def _dense(t: torch.Tensor) -> bool:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    # Any permutation of a contiguous block (e.g. a transposed matrix) is dense too.
    numel, expected = 1, 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
        numel *= size
    return True


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a step's scalars (norms, dots, scales) for tensors of ``dtype``.

    [note: fp64 scalars] fp32 for fp32/fp16/bf16 (the kernels' math), fp64 for fp64 tensors: an fp64
    run is how a user checks against an exact reference, and fp32 scalars would cap it at ~1e-7
    relative (worse where a variant subtracts nearly parallel vectors, as LookSAM's g_v does).
    """
    return torch.float64 if dtype == torch.float64 else FP32


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def pack_fp32(tensors: list[torch.Tensor]) -> torch.Tensor:
    """All elements of ``tensors`` (in order) as one flat fp32 tensor: two kernels in total."""
    return torch.cat([t.reshape(-1) for t in tensors]).to(FP32)


def flat_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive slices of ``flat`` shaped like each tensor of ``like``."""
    views, start = [], 0
    for t in like:
        n = t.numel()
        views.append(flat[start:start + n].view(t.shape))
        start += n
    return views


def unpack_into_(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat fp32 tensor back into ``tensors`` with one rounding (cast once, then one copy)."""
    src = flat.to(tensors[0].dtype)
    torch._foreach_copy_(tensors, flat_views(src, tensors))


def as_device_scalar(x, device: torch.device, dtype: torch.dtype = FP32) -> torch.Tensor:
    """A 0-dim tensor on ``device``; tensors are moved without a host sync, floats are wrapped."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype, non_blocking=True).reshape(())
    return torch.tensor(float(x), dtype=dtype, device=device)


def add_scaled_or_skip_(params: list[torch.Tensor], directions: list[torch.Tensor],
                        scale: torch.Tensor, skip: torch.Tensor) -> None:
    """``params += scale * directions`` unless the device flag ``skip`` (fp32, 1.0 = skip) is set.

    ``scale`` and ``skip`` are 0-dim fp32 tensors on the params' device. No host sync either way.
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if has_fused_kernels(device, dtype, "sgd") and fused_layouts_ok(params, directions):
        torch._fused_sgd_(params, directions, [], weight_decay=0.0, momentum=0.0, lr=-scale,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
                          grad_scale=None, found_inf=skip)
        return
    keep = skip == 0
    moved = torch._foreach_add(params, torch._foreach_mul(directions, scale.to(dtype)))
    for p, m in zip(params, moved):
        p.copy_(torch.where(keep, m, p))
