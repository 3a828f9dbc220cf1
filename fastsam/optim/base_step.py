"""Fusing the restore with the base optimizer's step.

[note: why the base step is fused, and when it is not]
A SAM step ends with ``w = backup`` followed by the base optimizer's update. For the two bases
almost everyone uses, ``torch.optim.SGD`` and ``torch.optim.AdamW`` (and ``Adam`` when its weight
decay is decoupled or zero), fastsam does both in one pass with
:func:`fastsam.ops.restore_sgd_step_` / :func:`fastsam.ops.restore_adamw_step_`, reading the
hyper-parameters from the shared param groups and keeping the optimizer state in exactly torch's
format (``momentum_buffer``; ``step``/``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``), so
``state_dict()`` round-trips with the stock optimizers. Every other base (subclasses included,
``differentiable=True``, or anything with a closure-based step) gets ``restore_`` followed by its
own ``step()``: correct for any optimizer, one more pass over the weights.

One difference from the stock classes: the fused AdamW path keeps ``step`` on the parameters'
device (as torch's ``fused=True``/``capturable=True`` do), so bias corrections need no host sync.
"""

from __future__ import annotations

import torch

from fastsam import ops

from ._sharding import local_list as _local

try:  # torch's dtype for optimizer step counters (fp32 unless the default dtype is fp64)
    from torch.optim.optimizer import _get_scalar_dtype
except Exception:  # pragma: no cover
    def _get_scalar_dtype():
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FusedBaseStep:
    """Interface: ``step_bucket`` restores and steps one (group, device, dtype) bucket."""

    name = "generic"

    def step_bucket(self, opt, group, params, grads, backups, backend, grad_scale, found_inf) -> None:
        raise NotImplementedError


class FusedSGDStep(FusedBaseStep):
    name = "sgd"

    @staticmethod
    def applies(base: torch.optim.Optimizer) -> bool:
        return type(base) is torch.optim.SGD and not any(g.get("differentiable", False) for g in base.param_groups)

    def step_bucket(self, opt, group, params, grads, backups, backend, grad_scale, found_inf) -> None:
        momentum = group["momentum"]
        kw = dict(lr=group["lr"], momentum=momentum, dampening=group["dampening"], nesterov=group["nesterov"],
                  weight_decay=group["weight_decay"], maximize=group.get("maximize", False),
                  grad_scale=grad_scale, found_inf=found_inf, backend=backend)
        if momentum == 0:
            ops.restore_sgd_step_(_local(params), _local(grads), _local(backups), [], is_first_step=False, **kw)
            return
        # torch.optim.SGD starts the buffer as a copy of the first gradient (no dampening), so
        # parameters without a buffer yet take the "first step" form of the update.
        have, fresh = [], []
        for i, p in enumerate(params):
            (fresh if opt.state[p].get("momentum_buffer") is None else have).append(i)
        for idx, first in ((have, False), (fresh, True)):
            if not idx:
                continue
            bufs = []
            for i in idx:
                st = opt.state[params[i]]
                if first:
                    st["momentum_buffer"] = torch.empty_like(params[i], memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            ops.restore_sgd_step_(_local([params[i] for i in idx]), _local([grads[i] for i in idx]),
                                  _local([backups[i] for i in idx]), _local(bufs), is_first_step=first, **kw)


class FusedAdamWStep(FusedBaseStep):
    name = "adamw"

    @staticmethod
    def applies(base: torch.optim.Optimizer) -> bool:
        if any(g.get("differentiable", False) for g in base.param_groups):
            return False
        if type(base) is torch.optim.AdamW:
            return True
        if type(base) is torch.optim.Adam:  # identical maths when the decay is decoupled or absent
            return all(g.get("decoupled_weight_decay", False) or g["weight_decay"] == 0 for g in base.param_groups)
        return False

    def step_bucket(self, opt, group, params, grads, backups, backend, grad_scale, found_inf) -> None:
        amsgrad = group.get("amsgrad", False)
        exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
        for p in params:
            st = opt.state[p]
            if len(st) == 0:
                st["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if st["step"].device != p.device:  # loaded from a CPU-step checkpoint: move once
                st["step"] = st["step"].to(p.device)
            if amsgrad and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
            if amsgrad:
                max_sqs.append(st["max_exp_avg_sq"])
        beta1, beta2 = group["betas"]
        ops.restore_adamw_step_(_local(params), _local(grads), _local(backups), _local(exp_avgs), _local(exp_avg_sqs),
                                _local(max_sqs), steps, lr=group["lr"],
                                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                amsgrad=amsgrad, maximize=group.get("maximize", False), grad_scale=grad_scale,
                                found_inf=found_inf, backend=backend)


def fused_base_step_for(base: torch.optim.Optimizer) -> FusedBaseStep | None:
    """The fused restore+step for ``base``, or None when its own ``step()`` must run."""
    for cls in (FusedSGDStep, FusedAdamWStep):
        if cls.applies(base):
            return cls()
    return None
