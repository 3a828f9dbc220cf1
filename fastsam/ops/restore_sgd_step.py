"""Restore the weights and take the SGD step, fused (the second half of a SAM step).

With ``g'`` the gradient at the perturbed point, exactly ``torch.optim.SGD``'s update applied to the
restored weights (all math in fp32):

    w   = backup
    d   = g' / grad_scale                      (when a GradScaler scale is given)
    d   = -d                                   (maximize)
    d   = d + weight_decay * w
    buf = d                                    (first step)
    buf = momentum * buf + (1 - dampening) * d (later steps)
    d   = d + momentum * buf  (nesterov)  or  buf
    w   = w - lr * d

If the device flag ``found_inf`` is set the weights are still restored but the step (and the
momentum update) is skipped, as ``GradScaler`` expects. With ``grad_scale``, backends may leave
``grads`` unscaled in place (torch's fused kernels do). ``lr`` may be a float or a 0-dim tensor.
A parameter that was not perturbed may pass itself as its backup.

Backend contract (``register("restore_sgd_step", backend)``): ``fn(params, grads, backups,
momentum_buffers, lr, momentum, dampening, nesterov, weight_decay, maximize, is_first_step,
grad_scale, found_inf) -> None`` on one bucket; ``momentum_buffers`` is empty when momentum is 0.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, fused_layouts_ok, has_fused_kernels, is_low_precision, pack_fp32, unpack_into_


def restore_sgd_step_(params, grads, backups, momentum_buffers, *, lr, momentum: float = 0.0,
                      dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                      maximize: bool = False, is_first_step: bool = False,
                      grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                      backend: str | None = "auto") -> None:
    """Fused ``w = backup`` + SGD step (see module docstring), in place on every list."""
    params, grads, backups = list(params), list(grads), list(backups)
    momentum_buffers = list(momentum_buffers)
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError("momentum != 0 needs one momentum buffer per parameter")
    check_like_params(params, grads=grads, backups=backups, **({"momentum_buffers": momentum_buffers}
                                                               if momentum != 0 else {}))
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    for (device, dtype), idx in group_by_device_dtype(params).items():
        _, fn = resolve("restore_sgd_step", backend, device, dtype)
        fn([params[i] for i in idx], [grads[i] for i in idx], [backups[i] for i in idx],
           [momentum_buffers[i] for i in idx] if momentum != 0 else [],
           lr, momentum, dampening, nesterov, weight_decay, maximize, is_first_step,
           _on(grad_scale, device), _on(found_inf, device))


def _on(t, device):
    return None if t is None else t.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

@register("restore_sgd_step", "torch")
def restore_sgd_step_torch(params, grads, backups, momentum_buffers, lr, momentum, dampening, nesterov,
                           weight_decay, maximize, is_first_step, grad_scale, found_inf) -> None:
    check_bucket("restore_sgd_step", params, grads=grads, backups=backups,
                 **({"momentum_buffers": momentum_buffers} if momentum != 0 else {}))
    if not params:
        return
    torch._foreach_copy_(params, backups)
    device, dtype = params[0].device, params[0].dtype
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=device, dtype=FP32, non_blocking=True)
    if has_fused_kernels(device, dtype, "sgd") and fused_layouts_ok(params, grads, momentum_buffers):
        # torch's own fused SGD kernel: one pass, fp32 math, reads grad_scale/found_inf on device.
        _fused_sgd_(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay, maximize,
                    is_first_step, grad_scale, found_inf)
    elif is_low_precision(dtype) and has_fused_kernels(device, FP32, "sgd"):
        # Pack to fp32, step there, write back with one rounding (see _torch_common's notes).
        work = [pack_fp32(params)]
        bufs = [pack_fp32(momentum_buffers)] if momentum != 0 else []
        _fused_sgd_(work, [pack_fp32(grads)], bufs, lr, momentum, dampening, nesterov, weight_decay, maximize,
                    is_first_step, grad_scale, found_inf)
        unpack_into_(params, work[0])
        if bufs:
            unpack_into_(momentum_buffers, bufs[0])
    else:
        _sgd_step_foreach_(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay,
                           maximize, is_first_step, grad_scale, found_inf)


def _fused_sgd_(params, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, is_first_step,
                grad_scale, found_inf) -> None:
    torch._fused_sgd_(params, grads, bufs if momentum != 0 else [], weight_decay=weight_decay, momentum=momentum,
                      lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize, is_first_step=is_first_step,
                      grad_scale=grad_scale, found_inf=found_inf)


def _sgd_step_foreach_(params, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize,
                       is_first_step, grad_scale, found_inf) -> None:
    """Generic path for devices without fused kernels (per-tensor select for the skip flag)."""
    d = torch._foreach_div(grads, grad_scale) if grad_scale is not None else list(grads)
    if maximize:
        d = torch._foreach_neg(d)
    if weight_decay != 0:
        d = torch._foreach_add(d, params, alpha=weight_decay)
    new_bufs = None
    if momentum != 0:
        if is_first_step:
            new_bufs = [x.clone() for x in d]
        else:
            new_bufs = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(new_bufs, d, alpha=1 - dampening)
        d = torch._foreach_add(d, new_bufs, alpha=momentum) if nesterov else new_bufs
    new_w = torch._foreach_mul(d, lr) if isinstance(lr, torch.Tensor) else torch._foreach_mul(d, float(lr))
    new_w = torch._foreach_sub(params, new_w)
    keep = None if found_inf is None else (found_inf == 0)
    for i, p in enumerate(params):
        p.copy_(new_w[i] if keep is None else torch.where(keep, new_w[i], p))
        if new_bufs is not None:
            bufs[i].copy_(new_bufs[i] if keep is None else torch.where(keep, new_bufs[i], bufs[i]))


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/restore_sgd_step.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("restore_sgd_step", "cuda")
def restore_sgd_step_cuda(params, grads, backups, momentum_buffers, lr, momentum, dampening, nesterov,
                          weight_decay, maximize, is_first_step, grad_scale, found_inf) -> None:
    if not params:
        return
    lr_tensor, lr_value = _cuda.lr_args(lr, params[0].device)
    _cuda.call("restore_sgd_step_",
               (params, grads, backups, momentum_buffers if momentum != 0 else [], lr_tensor, lr_value,
                float(momentum), float(dampening), bool(nesterov), float(weight_decay), bool(maximize),
                bool(is_first_step), grad_scale, found_inf),
               restore_sgd_step_torch,
               (params, grads, backups, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay, maximize,
                is_first_step, grad_scale, found_inf))


@_cuda.fake("restore_sgd_step_")
def _restore_sgd_step_fake(params, grads, backups, momentum_buffers, lr_tensor, lr, momentum, dampening, nesterov,
                           weight_decay, maximize, is_first_step, grad_scale, found_inf):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("restore_sgd_step", "triton")
def restore_sgd_step_triton(params, grads, backups, momentum_buffers, lr, momentum, dampening, nesterov,
                            weight_decay, maximize, is_first_step, grad_scale, found_inf) -> None:
    check_bucket("restore_sgd_step", params, grads=grads, backups=backups,
                 **({"momentum_buffers": momentum_buffers} if momentum != 0 else {}))
    from fastsam.kernels import restore_sgd_step as kernels  # imported on first use: triton is optional

    kernels.restore_sgd_step_entry(params, grads, backups, momentum_buffers, lr, momentum, dampening, nesterov,
                                   weight_decay, maximize, is_first_step, grad_scale, found_inf)
