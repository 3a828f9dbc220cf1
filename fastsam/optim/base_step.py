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


try:  # torch's dtype for optimizer step counters (fp32 unless the default dtype is fp64)
    from torch.optim.optimizer import _get_scalar_dtype
except Exception:  # pragma: no cover
    def _get_scalar_dtype():
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FusedBaseStep:
    """Interface: ``step_bucket`` restores and steps one (group, device, dtype) bucket.

    Buckets are homogeneous by construction and their state is created here like the parameters,
    so the op's backend implementation is called directly (the public op wrapper would re-check and
    re-group every tensor each step, which costs more than the step itself for many small tensors).
    """

    name = "generic"

    def plan_bucket(self, opt, group, device, dtype, params, grads, backups, grad_scale, found_inf):
        """Check the bucket's optimizer state and resolve its op; return a callable that runs the step.

        Planning modifies nothing, so ``second_step`` plans every bucket before it restores or steps any.
        """
        raise NotImplementedError

    def step_bucket(self, opt, group, device, dtype, params, grads, backups, grad_scale, found_inf) -> None:
        self.plan_bucket(opt, group, device, dtype, params, grads, backups, grad_scale, found_inf)()


def _on(t, device):
    return None if t is None else t.to(device, non_blocking=True)


class FusedSGDStep(FusedBaseStep):
    name = "sgd"

    @staticmethod
    def applies(base: torch.optim.Optimizer) -> bool:
        return type(base) is torch.optim.SGD and not any(g.get("differentiable", False) for g in base.param_groups)

    def plan_bucket(self, opt, group, device, dtype, params, grads, backups, grad_scale, found_inf):
        _, fn = ops.resolve("restore_sgd_step", opt.backend, device, dtype)
        momentum = group["momentum"]
        hyper = (group["lr"], momentum, group["dampening"], group["nesterov"], group["weight_decay"],
                 group.get("maximize", False))
        scale, found = _on(grad_scale, device), _on(found_inf, device)
        loc = opt._locals
        if momentum == 0:
            return lambda: fn(loc(params), loc(grads), loc(backups), [], *hyper, False, scale, found)
        # torch.optim.SGD starts the buffer as a copy of the first gradient (no dampening), so
        # parameters without a buffer yet take the "first step" form of the update.
        state = opt.state
        bufs = [state[p].get("momentum_buffer") if p in state else None for p in params]
        check_state_like_params(opt, "momentum_buffer", params, bufs)

        def run():
            if all(b is not None for b in bufs):
                fn(loc(params), loc(grads), loc(backups), loc(bufs), *hyper, False, scale, found)
                return
            for first in (False, True):
                idx = [i for i, b in enumerate(bufs) if (b is None) == first]
                if not idx:
                    continue
                if first:
                    for i in idx:
                        # Zeros, not empty: if a GradScaler skips this first step on the device, the
                        # buffer must still hold a valid (fresh) momentum for the next one.
                        bufs[i] = state[params[i]]["momentum_buffer"] = torch.zeros_like(
                            params[i], memory_format=torch.preserve_format)
                fn(loc([params[i] for i in idx]), loc([grads[i] for i in idx]), loc([backups[i] for i in idx]),
                   loc([bufs[i] for i in idx]), *hyper, first, scale, found)

        return run


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

    def plan_bucket(self, opt, group, device, dtype, params, grads, backups, grad_scale, found_inf):
        _, fn = ops.resolve("restore_adamw_step", opt.backend, device, dtype)
        amsgrad = group.get("amsgrad", False)
        state = opt.state
        states = [state.get(p) for p in params]
        for p, st in zip(params, states):
            if st:  # an existing state must be complete (a fresh parameter's is created below)
                missing = [k for k in ADAMW_STATE_KEYS if k not in st]
                if missing:
                    raise KeyError(f"AdamW state of {param_label(opt, p)} lacks {missing} (it has {sorted(st)}); "
                                   "the optimizer state is incomplete")
        present = [st if st else None for st in states]
        check_state_like_params(opt, "exp_avg", params, [st and st["exp_avg"] for st in present])
        check_state_like_params(opt, "exp_avg_sq", params, [st and st["exp_avg_sq"] for st in present])
        if amsgrad:
            check_state_like_params(opt, "max_exp_avg_sq", params,
                                    [st.get("max_exp_avg_sq") if st else None for st in present])
        for p, st in zip(params, present):
            if st is not None and (not isinstance(st["step"], torch.Tensor) or st["step"].numel() != 1):
                raise ValueError(f"AdamW state 'step' of {param_label(opt, p)} must be a one-element tensor, "
                                 f"got {st['step']!r}")
        beta1, beta2 = group["betas"]
        loc = opt._locals

        def run():
            exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
            device_index = params[0].get_device() if params else -1
            for p in params:
                st = state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if amsgrad:
                        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                step = st["step"]
                if step.get_device() != device_index:  # loaded from a CPU-step checkpoint: move once
                    step = st["step"] = step.to(p.device)
                if amsgrad and "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                steps.append(step)
                if amsgrad:
                    max_sqs.append(st["max_exp_avg_sq"])
            fn(loc(params), loc(grads), loc(backups), loc(exp_avgs), loc(exp_avg_sqs), loc(max_sqs), steps,
               group["lr"], beta1, beta2, group["eps"], group["weight_decay"], amsgrad, group.get("maximize", False),
               _on(grad_scale, device), _on(found_inf, device))

        return run


ADAMW_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def param_label(opt, p) -> str:
    """``parameter i (group g, position j, name 'fc.weight')`` for error messages."""
    flat = 0
    for gi, group in enumerate(opt.param_groups):
        for j, q in enumerate(group["params"]):
            if q is p:
                names = group.get("param_names")
                name = f", name {names[j]!r}" if names and j < len(names) else ""
                return f"parameter {flat} (group {gi}, position {j}{name}, shape {tuple(p.shape)})"
            flat += 1
    return f"a parameter of shape {tuple(p.shape)}"


def check_state_like_params(opt, key: str, params: list, values: list) -> None:
    """State tensors the fused kernels walk alongside the weights: the parameter's shape, dtype and device.

    ``None`` entries (no state yet) are skipped. One C-level comparison per list in the usual case.
    """
    present = [(p, v) for p, v in zip(params, values) if v is not None]
    if not present:
        return
    ps, vs = [p for p, _ in present], [v for _, v in present]
    if list(map(torch.Tensor.size, ps)) == list(map(torch.Tensor.size, vs)) and \
            list(map(_dtype_of, ps)) == list(map(_dtype_of, vs)) and \
            list(map(torch.Tensor.get_device, ps)) == list(map(torch.Tensor.get_device, vs)):
        return
    for p, v in present:
        if v.shape != p.shape or v.dtype != p.dtype or v.device != p.device:
            raise ValueError(f"optimizer state {key!r} of {param_label(opt, p)} is {tuple(v.shape)}/{v.dtype}/"
                             f"{v.device}, but the parameter is {tuple(p.shape)}/{p.dtype}/{p.device}")


def _dtype_of(t: torch.Tensor) -> torch.dtype:
    return t.dtype


def fused_base_step_for(base: torch.optim.Optimizer) -> FusedBaseStep | None:
    """The fused restore+step for ``base``, or None when its own ``step()`` must run."""
    for cls in (FusedSGDStep, FusedAdamWStep):
        if cls.applies(base):
            return cls()
    return None
