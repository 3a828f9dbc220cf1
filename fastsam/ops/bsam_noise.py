"""bSAM's noisy weights: ``backup = w; w += n / sqrt(num_data * s)``, ``n ~ N(0, 1)``, in place.

Bayesian SAM (Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023) takes its
first gradient at a sample of its Gaussian posterior ``N(w, 1 / (num_data * s))`` (``s`` the
per-element precision). The noise is drawn from ``generator`` as one flat fp32 draw of
``sum(numel)`` standard normals per call, tensors in list order (so a run is reproduced by the
generator's state alone). Math in fp32 (fp64 for fp64 tensors).

Every backend draws the noise the same way, with torch, before its arithmetic: one
``torch.randn(sum(numel), generator=generator, device=..., dtype=float32)`` per bucket, element ``i``
of tensor ``t`` at ``sum(numel of the tensors before t) + i`` in row-major order. So the Triton and
CUDA backends give the torch backend's noise exactly, and a run is reproduced by the generator's
state whatever the backend. Their fused kernel then does ``backup = w; w += n / sqrt(num_data * s)``
in one pass reading that flat buffer: an extra fp32 buffer of ``sum(numel)`` elements (4 bytes per
element, freed after the call) and 24 bytes of traffic per fp32 element instead of the 16 a kernel
generating its own normals would need; the price of identical, backend-independent samples.

Backend contract (``register("bsam_noise", backend)``): ``fn(params, backups, precisions, num_data,
generator) -> None`` on one bucket; ``generator`` a ``torch.Generator`` on the bucket's device.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, is_low_precision, pack_fp32, unpack_into_


def bsam_noise_(params: list[torch.Tensor], backups: list[torch.Tensor], precisions: list[torch.Tensor],
                num_data: int, generator: torch.Generator, *, backend: str | None = "auto") -> None:
    """``backups[i] = params[i]; params[i] += n_i / sqrt(num_data * precisions[i])`` (see module docstring)."""
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data must be an int >= 1, got {num_data!r}")
    params, backups, precisions = list(params), list(backups), list(precisions)
    check_like_params(params, backups=backups, precisions=precisions)
    for (device, dtype), idx in group_by_device_dtype(params).items():
        _, fn = resolve("bsam_noise", backend, device, dtype)
        fn([params[i] for i in idx], [backups[i] for i in idx], [precisions[i] for i in idx], num_data, generator)


def draw_flat(params, generator: torch.Generator) -> torch.Tensor:
    """The bucket's standard normals: one flat fp32 draw of ``sum(numel)`` (every backend's draw)."""
    total = sum(p.numel() for p in params)
    return torch.randn(total, generator=generator, device=params[0].device, dtype=FP32)


def draw_noise(params, generator: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    """:func:`draw_flat` split into views shaped like ``params`` (fp64 for an fp64 bucket).

    The split is one op; the per-tensor views are metadata only (no kernel launches).
    """
    return _noise_views(draw_flat(params, generator), params, dtype)


def _noise_views(flat: torch.Tensor, params, dtype: torch.dtype) -> list[torch.Tensor]:
    if dtype == torch.float64:
        flat = flat.double()
    return [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)]


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

@register("bsam_noise", "torch")
def bsam_noise_torch(params, backups, precisions, num_data, generator) -> None:
    check_bucket("bsam_noise", params, backups=backups, precisions=precisions)  # before the draw
    if not params:
        return
    apply_noise_torch(params, backups, precisions, num_data, draw_flat(params, generator))


def apply_noise_torch(params, backups, precisions, num_data, flat: torch.Tensor) -> None:
    """The torch backend's arithmetic on a drawn ``flat`` buffer (also the kernels' layout fallback)."""
    torch._foreach_copy_(backups, params)
    low = is_low_precision(params[0].dtype)
    if low:
        work_w, work_s = [pack_fp32(params)], [pack_fp32(precisions)]
        noise = [flat]
    else:
        work_w, work_s = params, precisions
        noise = _noise_views(flat, params, params[0].dtype)
    std = torch._foreach_mul(work_s, float(num_data))
    torch._foreach_rsqrt_(std)
    torch._foreach_mul_(std, noise)
    torch._foreach_add_(work_w, std)
    if low:
        unpack_into_(params, work_w[0])


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/bsam_noise.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("bsam_noise", "cuda")
def bsam_noise_cuda(params, backups, precisions, num_data, generator) -> None:
    check_bucket("bsam_noise", params, backups=backups, precisions=precisions)  # before the draw
    if not params:
        return
    flat = draw_flat(params, generator)
    # A layout the kernel declines (not contiguous) runs the torch arithmetic on the same draw.
    _cuda.call("bsam_noise_", (params, backups, precisions, flat, float(num_data)), apply_noise_torch,
               (params, backups, precisions, num_data, flat))


@_cuda.fake("bsam_noise_")
def _bsam_noise_fake(params, backups, precisions, noise, num_data):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("bsam_noise", "triton")
def bsam_noise_triton(params, backups, precisions, num_data, generator) -> None:
    check_bucket("bsam_noise", params, backups=backups, precisions=precisions)  # before the draw
    if not params:
        return
    from fastsam.kernels import bsam_noise as kernels  # imported on first use: triton is optional

    kernels.bsam_noise_entry(params, backups, precisions, draw_flat(params, generator), float(num_data))
