"""bSAM's update: restore the clean weights, then momentum, weights and precision, in one op.

Bayesian SAM (Möllenhoff & Khan, ICLR 2023; the authors' ``optim.py``). With ``g_p`` the gradient at
the perturbed point, ``h = sqrt(s) |g|`` from the noisy gradient, ``w`` the clean weights (the
backup), weight decay ``delta`` and ``damping``:

    w = backup
    m = beta1 m + (1 - beta1) (g_p + delta w)
    w = w - lr * m / s
    s = beta2 s + (1 - beta2) (h + damping + delta)

(``s`` is updated last: the weight step uses the precision the perturbation used.) Math in fp32
(fp64 for fp64 tensors); ``lr`` a float or a 0-dim tensor.

Backend contract (``register("bsam_step", backend)``): ``fn(params, backups, grads, momenta,
precisions, scales, lr, beta1, beta2, weight_decay, damping) -> None`` on one bucket.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import is_low_precision, pack_fp32, unpack_into_


def bsam_step_(params, backups, grads, momenta, precisions, scales, *, lr, beta1: float, beta2: float,
               weight_decay: float, damping: float, backend: str | None = "auto") -> None:
    """The update above, in place on ``params``, ``momenta`` and ``precisions``."""
    lists = [list(x) for x in (params, backups, grads, momenta, precisions, scales)]
    check_like_params(lists[0], backups=lists[1], grads=lists[2], momenta=lists[3], precisions=lists[4],
                      scales=lists[5])
    for (device, dtype), idx in group_by_device_dtype(lists[0]).items():
        _, fn = resolve("bsam_step", backend, device, dtype)
        fn(*([lst[i] for i in idx] for lst in lists), lr, float(beta1), float(beta2), float(weight_decay),
           float(damping))


@register("bsam_step", "torch")
def bsam_step_torch(params, backups, grads, momenta, precisions, scales, lr, beta1, beta2, weight_decay,
                    damping) -> None:
    check_bucket("bsam_step", params, backups=backups, grads=grads, momenta=momenta, precisions=precisions,
                 scales=scales)
    if not params:
        return
    low = is_low_precision(params[0].dtype)
    w, g, m, s, h = ([pack_fp32(x)] if low else x for x in (backups, grads, momenta, precisions, scales))
    if not low:
        torch._foreach_copy_(params, backups)
        w = params
    dtype = w[0].dtype
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=w[0].device, dtype=dtype)
    target = torch._foreach_add(g, w, alpha=weight_decay)       # g_p + delta w
    torch._foreach_lerp_(m, target, 1.0 - beta1)                 # beta1 m + (1 - beta1) target
    step = torch._foreach_div(m, s)
    torch._foreach_mul_(step, -lr)
    torch._foreach_add_(w, step)                                  # w - lr m / s
    target_s = torch._foreach_add(h, damping + weight_decay)
    torch._foreach_lerp_(s, target_s, 1.0 - beta2)               # beta2 s + (1 - beta2) target
    if low:
        unpack_into_(params, w[0])
        unpack_into_(momenta, m[0])
        unpack_into_(precisions, s[0])


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/bsam_step.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("bsam_step", "cuda")
def bsam_step_cuda(params, backups, grads, momenta, precisions, scales, lr, beta1, beta2, weight_decay,
                   damping) -> None:
    if not params:
        return
    lr_tensor, lr_value = _cuda.lr_args(lr, params[0].device)
    _cuda.call("bsam_step_", (params, backups, grads, momenta, precisions, scales, lr_tensor, lr_value, float(beta1),
                              float(beta2), float(weight_decay), float(damping)),
               bsam_step_torch, (params, backups, grads, momenta, precisions, scales, lr, beta1, beta2, weight_decay,
                                 damping))


@_cuda.fake("bsam_step_")
def _bsam_step_fake(params, backups, grads, momenta, precisions, scales, lr_tensor, lr, beta1, beta2, weight_decay,
                    damping):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("bsam_step", "triton")
def bsam_step_triton(params, backups, grads, momenta, precisions, scales, lr, beta1, beta2, weight_decay,
                     damping) -> None:
    check_bucket("bsam_step", params, backups=backups, grads=grads, momenta=momenta, precisions=precisions,
                 scales=scales)
    from fastsam.kernels import bsam_step as kernels  # imported on first use: triton is optional

    kernels.bsam_step_entry(params, backups, grads, momenta, precisions, scales, lr, beta1, beta2, weight_decay,
                            damping)
