"""Momentum-SAM's fused update (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", 2024): the momentum-direction perturbation fused into the base step.

Between steps Momentum-SAM keeps the weights at the ascent point ``w~ = w - s v`` (``v`` the momentum
buffer, ``s = rho / (||v|| + eps)`` the last step's scale), so the one forward/backward of a step
already gives the gradient at the perturbed point. A step is then, per element (math in fp32):

``momentum_sam_sgd_`` (SGD form, ``torch.optim.SGD``'s momentum convention, no dampening)::

    d   = g + weight_decay * w~          (decay on the weights the gradient was taken at, as the authors)
    w   = w~ + s_old * v                 (back from the old ascent point)
    v   = momentum * v + d
    w   = w - lr * (d + momentum * v  if nesterov  else  v)
    returns sum(v^2)                     (the squared norm of the new momentum, fp32, on the device)

``momentum_sam_adamw_`` (AdamW form, the authors' ``AdamW_MSAM``: decay applied after the Adam step)::

    w   = w~ + s_old * m
    m   = beta1 * m + (1 - beta1) * g;   u = beta2 * u + (1 - beta2) * g^2
    w   = w - lr / (1 - beta1^t) * m / (sqrt(u) / sqrt(1 - beta2^t) + eps)
    w   = w * (1 - lr * weight_decay)
    returns sum(m^2)

``momentum_sam_shift_``::

    backup = w      (when backups are given)
    w      = w + scale * v

The optimizer sums the squared norms over every bucket, forms ``s_new = rho / (sqrt(sum) + eps)``
on the device and calls ``momentum_sam_shift_`` with ``scale = -s_new`` (the new ascent point); the
same op with ``scale = +s`` and backups gives the unperturbed weights for evaluation. ``s_old`` and
``scale`` are 0-dim device tensors (no host sync); ``lr`` a float. Math and the returned squared norm
are fp32, except for fp64 buckets, which stay fp64 throughout.

Backends: ``torch`` (below, the reference: ``_foreach_*`` passes, flat fp32 copies for fp16/bf16, the
only one for fp64), ``triton`` (``kernels/momentum_sam.py``) and ``cuda`` (``csrc/momentum_sam.cu``).
The compiled two make each step one pass over the lists (read w, g, v, write w, v: 20 fp32 bytes per
element for SGD; 28 for AdamW) that also writes one partial sum of the new momentum's squares per
block, then add the partials in a fixed order in one small launch (deterministic, no atomics, as
``grad_norm``); the shift is one pass (12 bytes, 16 with backups).

Backend contracts (one (device, dtype) bucket each):
``register("momentum_sam_sgd", b)``: ``fn(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov)
-> Tensor``; ``register("momentum_sam_adamw", b)``: ``fn(params, grads, exp_avgs, exp_avg_sqs, s_old, lr,
beta1, beta2, eps, weight_decay, step) -> Tensor``; ``register("momentum_sam_shift", b)``:
``fn(params, bufs, scale, backups_or_None) -> None``.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, as_device_scalar, is_low_precision, pack_fp32, unpack_into_


def _check_scalar(name: str, value, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise ValueError(f"{name} must be a finite number >= {lo}, got {value!r}")
    return float(value)


def _scale_on(scale, device, dtype) -> torch.Tensor:
    """The scale as a 0-dim device tensor: fp32, or fp64 for fp64 buckets (whose math is fp64 throughout)."""
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        raise ValueError(f"the scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
    return as_device_scalar(scale, device, torch.float64 if dtype == torch.float64 else FP32)


def _sum_parts(parts, device) -> torch.Tensor:
    total = None
    for part in parts:
        part = part.to(device, non_blocking=True)
        total = part if total is None else total + part
    return total


def momentum_sam_sgd_(params, grads, bufs, *, s_old, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                      nesterov: bool = False, backend: str | None = "auto") -> torch.Tensor:
    """The SGD form of the Momentum-SAM update (module docstring), in place; returns ``sum(v_new^2)``."""
    params, grads, bufs = list(params), list(grads), list(bufs)
    if not params:
        raise ValueError("momentum_sam_sgd_ needs at least one parameter")
    check_like_params(params, grads=grads, bufs=bufs)
    lr, momentum, weight_decay = (_check_scalar("lr", lr), _check_scalar("momentum", momentum),
                                  _check_scalar("weight_decay", weight_decay))
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires momentum > 0")
    plan = [(resolve("momentum_sam_sgd", backend, device, dtype)[1], device, dtype, idx)
            for (device, dtype), idx in group_by_device_dtype(params).items()]
    parts = [fn([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx], _scale_on(s_old, device, dtype),
                lr, momentum, weight_decay, bool(nesterov)) for fn, device, dtype, idx in plan]
    return _sum_parts(parts, params[0].device)


def momentum_sam_adamw_(params, grads, exp_avgs, exp_avg_sqs, *, s_old, lr: float, beta1: float = 0.9,
                        beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2, step: int = 1,
                        backend: str | None = "auto") -> torch.Tensor:
    """The AdamW form of the Momentum-SAM update (module docstring), in place; returns ``sum(m_new^2)``."""
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if not params:
        raise ValueError("momentum_sam_adamw_ needs at least one parameter")
    check_like_params(params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    lr, eps, weight_decay = _check_scalar("lr", lr), _check_scalar("eps", eps), _check_scalar("weight_decay", weight_decay)
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(b, (int, float)) and 0 <= b < 1):
            raise ValueError(f"{name} must be in [0, 1), got {b!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    plan = [(resolve("momentum_sam_adamw", backend, device, dtype)[1], device, dtype, idx)
            for (device, dtype), idx in group_by_device_dtype(params).items()]
    parts = [fn([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                [exp_avg_sqs[i] for i in idx], _scale_on(s_old, device, dtype), lr, float(beta1), float(beta2), eps,
                weight_decay, step) for fn, device, dtype, idx in plan]
    return _sum_parts(parts, params[0].device)


def momentum_sam_shift_(params, bufs, scale, backups=None, *, backend: str | None = "auto") -> None:
    """``backup = w`` (when ``backups`` is given), then ``w += scale * v``, in place."""
    params, bufs = list(params), list(bufs)
    backups = None if backups is None else list(backups)
    check_like_params(params, bufs=bufs, **({} if backups is None else {"backups": backups}))
    plan = [(resolve("momentum_sam_shift", backend, device, dtype)[1], device, dtype, idx)
            for (device, dtype), idx in group_by_device_dtype(params).items()]
    for fn, device, dtype, idx in plan:
        fn([params[i] for i in idx], [bufs[i] for i in idx], _scale_on(scale, device, dtype),
           None if backups is None else [backups[i] for i in idx])


# --------------------------------------------------------------------------------------------
# torch backend (the reference: torch._foreach_*, a constant number of kernels per bucket)
# --------------------------------------------------------------------------------------------

def _sq_norm(ts) -> torch.Tensor:
    acc = torch.float64 if ts[0].dtype == torch.float64 else FP32
    return torch.stack(torch._foreach_norm(ts, 2, dtype=acc)).square().sum()


def _sgd_core(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov):
    s = s_old.to(params[0].dtype)
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else list(grads)
    torch._foreach_add_(params, torch._foreach_mul(bufs, s))
    if momentum != 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d)
    else:  # v = d, not v + d: without momentum the old buffer drops out
        torch._foreach_copy_(bufs, d)
    step_dir = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, step_dir, alpha=-lr)
    return _sq_norm(bufs)


@register("momentum_sam_sgd", "torch")
def momentum_sam_sgd_torch(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov) -> torch.Tensor:
    check_bucket("momentum_sam_sgd", params, grads=grads, bufs=bufs)
    if not is_low_precision(params[0].dtype):
        return _sgd_core(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov)
    w, b = [pack_fp32(params)], [pack_fp32(bufs)]
    out = _sgd_core(w, [pack_fp32(grads)], b, s_old, lr, momentum, weight_decay, nesterov)
    unpack_into_(params, w[0])
    unpack_into_(bufs, b[0])
    # The norm of the buffers as stored (rounded), which is what the shift will move along.
    return _sq_norm(bufs)


def _adamw_core(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay, step):
    s = s_old.to(params[0].dtype)
    torch._foreach_add_(params, torch._foreach_mul(exp_avgs, s))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bc1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


@register("momentum_sam_adamw", "torch")
def momentum_sam_adamw_torch(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay,
                             step) -> torch.Tensor:
    check_bucket("momentum_sam_adamw", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if not is_low_precision(params[0].dtype):
        _adamw_core(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay, step)
        return _sq_norm(exp_avgs)
    w, m, u = [pack_fp32(params)], [pack_fp32(exp_avgs)], [pack_fp32(exp_avg_sqs)]
    _adamw_core(w, [pack_fp32(grads)], m, u, s_old, lr, beta1, beta2, eps, weight_decay, step)
    unpack_into_(params, w[0])
    unpack_into_(exp_avgs, m[0])
    unpack_into_(exp_avg_sqs, u[0])
    return _sq_norm(exp_avgs)


@register("momentum_sam_shift", "torch")
def momentum_sam_shift_torch(params, bufs, scale, backups) -> None:
    check_bucket("momentum_sam_shift", params, bufs=bufs, **({"backups": backups} if backups is not None else {}))
    if not params:
        return
    if backups is not None:
        torch._foreach_copy_(backups, params)
    if not is_low_precision(params[0].dtype):
        torch._foreach_add_(params, torch._foreach_mul(bufs, scale.to(params[0].dtype)))
        return
    w = pack_fp32(params)
    w.add_(pack_fp32(bufs) * scale)
    unpack_into_(params, w)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/momentum_sam.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("momentum_sam_sgd", "cuda")
def momentum_sam_sgd_cuda(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov) -> torch.Tensor:
    check_bucket("momentum_sam_sgd", params, grads=grads, bufs=bufs)
    args = (params, grads, bufs, s_old, float(lr), float(momentum), float(weight_decay), bool(nesterov))
    return _cuda.call("momentum_sam_sgd_", args, momentum_sam_sgd_torch, args)


@_cuda.fake("momentum_sam_sgd_")
def _momentum_sam_sgd_fake(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov):
    return params[0].new_empty((), dtype=FP32)


@register("momentum_sam_adamw", "cuda")
def momentum_sam_adamw_cuda(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay,
                            step) -> torch.Tensor:
    check_bucket("momentum_sam_adamw", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    args = (params, grads, exp_avgs, exp_avg_sqs, s_old, float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), int(step))
    return _cuda.call("momentum_sam_adamw_", args, momentum_sam_adamw_torch, args)


@_cuda.fake("momentum_sam_adamw_")
def _momentum_sam_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay, step):
    return params[0].new_empty((), dtype=FP32)


@register("momentum_sam_shift", "cuda")
def momentum_sam_shift_cuda(params, bufs, scale, backups) -> None:
    check_bucket("momentum_sam_shift", params, bufs=bufs, **({"backups": backups} if backups is not None else {}))
    if not params:
        return
    _cuda.call("momentum_sam_shift_", (params, bufs, scale, [] if backups is None else backups),
               momentum_sam_shift_torch, (params, bufs, scale, backups))


@_cuda.fake("momentum_sam_shift_")
def _momentum_sam_shift_fake(params, bufs, scale, backups):
    return None


# --------------------------------------------------------------------------------------------
# triton backend (kernels/momentum_sam.py)
# --------------------------------------------------------------------------------------------

@register("momentum_sam_sgd", "triton")
def momentum_sam_sgd_triton(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov) -> torch.Tensor:
    check_bucket("momentum_sam_sgd", params, grads=grads, bufs=bufs)
    from fastsam.kernels import momentum_sam as kernels  # imported on first use: triton is optional

    return kernels.momentum_sam_sgd_entry(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov)


@register("momentum_sam_adamw", "triton")
def momentum_sam_adamw_triton(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay,
                              step) -> torch.Tensor:
    check_bucket("momentum_sam_adamw", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    from fastsam.kernels import momentum_sam as kernels

    return kernels.momentum_sam_adamw_entry(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps,
                                            weight_decay, step)


@register("momentum_sam_shift", "triton")
def momentum_sam_shift_triton(params, bufs, scale, backups) -> None:
    check_bucket("momentum_sam_shift", params, bufs=bufs, **({"backups": backups} if backups is not None else {}))
    from fastsam.kernels import momentum_sam as kernels

    kernels.momentum_sam_shift_entry(params, bufs, scale, backups)
