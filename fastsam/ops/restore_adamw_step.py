"""Restore the weights and take the AdamW step, fused (the second half of a SAM step).

Exactly ``torch.optim.AdamW``'s update (Loshchilov & Hutter, ICLR 2019) applied to the restored
weights, all math in fp32, with ``g'`` the gradient at the perturbed point:

    w     = backup
    g     = g' / grad_scale      (when a GradScaler scale is given);  g = -g (maximize)
    step  = step + 1
    w     = w * (1 - lr * weight_decay)
    m     = beta1 * m + (1 - beta1) * g
    v     = beta2 * v + (1 - beta2) * g^2
    vmax  = max(vmax, v)          (amsgrad; v below means vmax)
    w     = w - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

If the device flag ``found_inf`` is set the weights are still restored but the step, the moments
and the step count are left as they were. With ``grad_scale``, backends may leave ``grads``
unscaled in place (torch's fused kernels do). ``state_steps`` are 0-dim fp32 tensors on the params'
device (as in torch's fused/capturable AdamW), so the bias corrections need no host sync.

Backend contract (``register("restore_adamw_step", backend)``): ``fn(params, grads, backups,
exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay, amsgrad,
maximize, grad_scale, found_inf) -> None`` on one bucket; ``max_exp_avg_sqs`` is empty unless
``amsgrad``; the implementation increments ``state_steps`` itself.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, check_like_params, check_scalars
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, fused_layouts_ok, has_fused_kernels


def restore_adamw_step_(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                        lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
                        grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                        backend: str | None = "auto") -> None:
    """Fused ``w = backup`` + AdamW step (see module docstring), in place on every list."""
    lists = [list(x) for x in (params, grads, backups, exp_avgs, exp_avg_sqs, state_steps)]
    params, grads, backups, exp_avgs, exp_avg_sqs, state_steps = lists
    max_exp_avg_sqs = list(max_exp_avg_sqs)
    n = len(params)
    if any(len(x) != n for x in lists) or (amsgrad and len(max_exp_avg_sqs) != n):
        raise ValueError("every list must have one entry per parameter (max_exp_avg_sqs when amsgrad)")
    check_like_params(params, grads=grads, backups=backups, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                      **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}))
    for p, s in zip(params, state_steps):
        if s.device != p.device or s.numel() != 1:
            raise ValueError("state_steps must be one-element tensors on the parameters' device")
    for (device, dtype), idx in group_by_device_dtype(params).items():
        _, fn = resolve("restore_adamw_step", backend, device, dtype)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        fn(pick(params), pick(grads), pick(backups), pick(exp_avgs), pick(exp_avg_sqs),
           pick(max_exp_avg_sqs) if amsgrad else [], pick(state_steps), lr, beta1, beta2, eps,
           weight_decay, amsgrad, maximize, _on(grad_scale, device), _on(found_inf, device))


def _on(t, device):
    return None if t is None else t.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

@register("restore_adamw_step", "torch")
def restore_adamw_step_torch(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                             lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
                             found_inf) -> None:
    check_bucket("restore_adamw_step", params, grads=grads, backups=backups, exp_avgs=exp_avgs,
                 exp_avg_sqs=exp_avg_sqs, **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}))
    check_scalars("restore_adamw_step", params, "state_steps", state_steps)
    if not params:
        return
    torch._foreach_copy_(params, backups)
    device, dtype = params[0].device, params[0].dtype
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=device, dtype=FP32, non_blocking=True)
    torch._foreach_add_(state_steps, 1)
    if has_fused_kernels(device, dtype, "adamw") and fused_layouts_ok(params, grads, exp_avgs, exp_avg_sqs,
                                                                     max_exp_avg_sqs if amsgrad else params):
        # torch's own fused AdamW kernel: one pass, fp32 math, grad_scale/found_inf read on device.
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
                            state_steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
    else:
        _adamw_step_foreach_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                             beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf)
    if found_inf is not None:
        torch._foreach_sub_(state_steps, [found_inf.to(state_steps[0].dtype)] * len(state_steps))


def _adamw_step_foreach_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                         weight_decay, amsgrad, maximize, grad_scale, found_inf) -> None:
    """Generic path for devices without fused kernels (per-tensor select for the skip flag)."""
    keep = None if found_inf is None else (found_inf == 0)
    for i, p in enumerate(params):
        g = grads[i].float()
        if grad_scale is not None:
            g = g / grad_scale
        if maximize:
            g = -g
        step = steps[i].to(FP32)
        w = p.float() * (1 - lr * weight_decay)
        m = exp_avgs[i].float().lerp(g, 1 - beta1)
        v = exp_avg_sqs[i].float() * beta2 + (1 - beta2) * g * g
        vmax = torch.maximum(max_exp_avg_sqs[i].float(), v) if amsgrad else v
        denom = vmax.sqrt() / (1 - beta2 ** step).sqrt() + eps
        w = w - lr / (1 - beta1 ** step) * m / denom
        pairs = [(p, w), (exp_avgs[i], m), (exp_avg_sqs[i], v)] + ([(max_exp_avg_sqs[i], vmax)] if amsgrad else [])
        for dst, src in pairs:
            dst.copy_(src if keep is None else torch.where(keep, src.to(dst.dtype), dst))


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/restore_adamw_step.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("restore_adamw_step", "cuda")
def restore_adamw_step_cuda(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                            beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf) -> None:
    if not params:
        return
    lr_tensor, lr_value = _cuda.lr_args(lr, params[0].device)
    _cuda.call("restore_adamw_step_",
               (params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps,
                lr_tensor, lr_value, float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
                bool(maximize), grad_scale, found_inf),
               restore_adamw_step_torch,
               (params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                weight_decay, amsgrad, maximize, grad_scale, found_inf))


@_cuda.fake("restore_adamw_step_")
def _restore_adamw_step_fake(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr_tensor,
                             lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("restore_adamw_step", "triton")
def restore_adamw_step_triton(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                              beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf) -> None:
    check_bucket("restore_adamw_step", params, grads=grads, backups=backups, exp_avgs=exp_avgs,
                 exp_avg_sqs=exp_avg_sqs, **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}))
    check_scalars("restore_adamw_step", params, "state_steps", state_steps)
    from fastsam.kernels import restore_adamw_step as kernels  # imported on first use: triton is optional

    kernels.restore_adamw_step_entry(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                     lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf)
