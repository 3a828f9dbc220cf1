"""Perturb the weights toward the sharpest nearby point, keeping a backup for the restore.

For each element, with ``s = rho / (norm + eps)`` read on the device:

* ``plain``    (SAM):        ``e = s * g``
* ``adaptive`` (ASAM):       ``e = s * (|w| + eta)^2 * g``
* ``fisher``   (Fisher SAM): ``e = s * g / (1 + eta g^2)``

then ``backup = w`` and ``w = w + e``. ``norm`` is the matching global norm from
:func:`fastsam.ops.grad_norm` (``||g||``, ``||T g||`` or the Fisher norm), so the perturbation has
length ``rho`` in the corresponding geometry (Foret et al. 2021; Kwon et al. 2021; Kim et al. 2022).

Stochastic weight perturbation (ESAM's SWP, Du et al., ICLR 2022): with ``beta < 1`` each element
is perturbed only if ``u(seed, offset + i) < beta`` (counter-based Philox, see ``_philox.py``; no
mask is stored and the seed regenerates it) and the kept perturbation is scaled by ``1 / beta`` so
its expectation equals SAM's. ``i`` counts elements across the list in order (per device/dtype bucket, buckets in
first-seen order, when the list mixes them).

If ``norm`` is not finite (an inf/NaN gradient, e.g. an fp16 overflow) the weights are left
untouched (the backup is still written), decided on the device without a host sync.

Backend contract (``register("perturb", backend)``): ``fn(params, grads, backups, norm, rho, mode,
eta, eps, beta, seed, offset) -> None`` on one bucket; ``norm`` is a 0-dim fp32 tensor on the
bucket's device; all math in fp32.
"""

from __future__ import annotations

import math

import torch

from . import _philox
from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import (FP32, add_scaled_or_skip_, as_device_scalar, flat_views, is_low_precision, pack_fp32,
                            scalar_dtype, unpack_into_)
from .grad_norm import check_mode


def check_perturb_args(rho: float, beta: float) -> None:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
        raise ValueError(f"beta (the SWP keep probability) must be in (0, 1], got {beta!r}")


def perturb_(params: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
             norm: torch.Tensor, rho: float, *, mode: str = "plain", eta: float = 0.0, eps: float = 1e-12,
             beta: float = 1.0, seed: int = 0, offset: int = 0, backend: str | None = "auto") -> None:
    """``backups[i].copy_(params[i]); params[i] += e_i`` (see module docstring), in place."""
    check_mode(mode, eta)
    check_perturb_args(rho, beta)
    params, grads, backups = list(params), list(grads), list(backups)
    check_like_params(params, grads=grads, backups=backups)
    run = offset
    for (device, dtype), idx in group_by_device_dtype(params).items():
        _, fn = resolve("perturb", backend, device, dtype)
        fn([params[i] for i in idx], [grads[i] for i in idx], [backups[i] for i in idx],
           norm.to(device, non_blocking=True), rho, mode, eta, eps, beta, seed, run)
        # SWP counters: each (device, dtype) bucket, in first-seen order, takes the next
        # consecutive range; for a single-bucket list element i simply gets counter offset + i.
        run += sum(params[i].numel() for i in idx)


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

def direction_torch(params, grads, mode: str, eta: float):
    """The un-scaled perturbation direction d (fp32 lists): g, (|w|+eta)^2 g, or g / (1 + eta g^2)."""
    if mode == "plain":
        return grads
    if mode == "adaptive":
        t = torch._foreach_abs(params)
        torch._foreach_add_(t, eta)
        torch._foreach_mul_(t, t)
        torch._foreach_mul_(t, grads)
        return t
    f = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(f, eta)
    torch._foreach_add_(f, 1.0)
    return torch._foreach_div(grads, f)


@register("perturb", "torch")
def perturb_torch(params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset) -> None:
    check_bucket("perturb", params, grads=grads, backups=backups)
    if not params:
        return
    device = params[0].device
    torch._foreach_copy_(backups, params)
    low = is_low_precision(params[0].dtype)
    work_w = [pack_fp32(params)] if low else params
    work_g = [pack_fp32(grads)] if low else grads
    d = direction_torch(work_w, work_g, mode, eta)
    acc = scalar_dtype(params[0].dtype)  # fp32 math, fp64 for fp64 weights
    norm = as_device_scalar(norm, device, acc)
    scale = rho / (norm + eps)
    if beta < 1.0:
        numel = sum(p.numel() for p in params)
        keep = _philox.keep_mask(seed, offset, numel, beta, device).to(acc)
        d = torch._foreach_mul(d, flat_views(keep, d) if not low else [keep])
        scale = scale / beta
    skip = (~torch.isfinite(norm)).to(FP32)
    add_scaled_or_skip_(work_w, d, scale, skip)
    if low:
        unpack_into_(params, work_w[0])


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/perturb.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("perturb", "cuda")
def perturb_cuda(params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset) -> None:
    if not params:
        return
    _cuda.call("perturb_", (params, grads, backups, norm, float(rho), mode, float(eta), float(eps), float(beta),
                            _cuda.to_int64(seed), int(offset)),
               perturb_torch, (params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset))


@_cuda.fake("perturb_")
def _perturb_fake(params, grads, backups, norm, rho, norm_mode, eta, eps, beta, seed, offset):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("perturb", "triton")
def perturb_triton(params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset) -> None:
    check_bucket("perturb", params, grads=grads, backups=backups)
    from fastsam.kernels import perturb as kernels  # imported on first use: triton is optional

    kernels.perturb_entry(params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset)
