"""Restore the weights saved by :func:`fastsam.ops.perturb_`: ``w = backup``, in place.

The copy goes into the parameters' own storage (never ``p.data = backup``), so optimizer state,
``torch.compile`` guards and captured CUDA graphs keep pointing at the same memory.

Backend contract (``register("restore", backend)``): ``fn(params, backups) -> None`` on one bucket.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve


def restore_(params: list[torch.Tensor], backups: list[torch.Tensor], *, backend: str | None = "auto") -> None:
    """``params[i].copy_(backups[i])`` for every i, a constant number of launches per bucket."""
    params, backups = list(params), list(backups)
    check_like_params(params, backups=backups)
    for (device, dtype), idx in group_by_device_dtype(params).items():
        _, fn = resolve("restore", backend, device, dtype)
        fn([params[i] for i in idx], [backups[i] for i in idx])


@register("restore", "torch")
def restore_torch(params, backups) -> None:
    check_bucket("restore", params, backups=backups)
    if params:
        torch._foreach_copy_(params, backups)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/restore.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("restore", "cuda")
def restore_cuda(params, backups) -> None:
    if params:
        _cuda.call("restore_", (params, backups), restore_torch, (params, backups))


@_cuda.fake("restore_")
def _restore_fake(params, backups):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("restore", "triton")
def restore_triton(params, backups) -> None:
    check_bucket("restore", params, backups=backups)
    from fastsam.kernels import restore as kernels  # imported on first use: triton is optional

    kernels.restore_entry(params, backups)
