"""Reference implementations the benchmarks measure fastsam against (written here, not imported).

* :class:`PerParameterSAM` - the classic per-parameter SAM loop, as most training code still writes
  it: the baseline of every optimizer benchmark.
* :func:`per_param_grad_norm` - its gradient norm on its own.
* :func:`threshold_select` - ESAM's data selection as the paper's official code does it: a top-k
  for the cut-off, then a strict ``>`` mask (which keeps ``k - 1`` samples and syncs with the host
  to size the result): the baseline of the SDS benchmark.
* ``foreach_*`` - the same SAM arithmetic written straightforwardly with ``torch._foreach_*`` ops
  and no fused kernels, so that ``torch.compile`` can trace it: what inductor makes of plain torch
  code (the ``foreach+compile`` provider).
"""

from __future__ import annotations

import torch


class PerParameterSAM(torch.optim.Optimizer):
    """SAM with one Python iteration (and several kernels) per parameter tensor.

    Per parameter: its own norm (stacked, then normed again), its own ``e_w`` tensor, a fresh copy
    of the weights, and a restore by swapping ``p.data``. Several kernel launches and two
    allocations per tensor per step, plus the host-side Python loop: what fastsam replaces.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def _grad_norm(self) -> torch.Tensor:
        device = self.param_groups[0]["params"][0].device
        per_tensor = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # The usual one-expression form: a weight (|w| for ASAM, else 1.0) times the gradient,
                # which materialises a temporary per tensor either way.
                weight = p.abs() if group["adaptive"] else 1.0
                per_tensor.append((weight * p.grad).norm(p=2).to(device))
        return torch.stack(per_tensor).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["w_saved"] = p.data.clone()
                e_w = (p * p if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Undo ``first_step`` without stepping (the benchmarks use it between timed calls)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "w_saved" in self.state[p]:
                    p.data = self.state[p].pop("w_saved")

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def per_param_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``||g||`` the per-parameter way: one norm kernel per tensor, stacked, normed again."""
    return torch.stack([g.norm(p=2) for g in grads]).norm(p=2)


def threshold_select(loss_before: torch.Tensor, loss_after: torch.Tensor, k: int) -> torch.Tensor:
    """ESAM's official selection: samples whose sharpness is strictly above the k-th largest.

    Keeps ``k - 1`` samples when values are distinct, and ``nonzero`` must learn the count on the
    host before it can size its result: a device-to-host sync every step.
    """
    sharpness = loss_after - loss_before
    cutoff = torch.topk(sharpness, k).values[-1]
    return torch.nonzero(sharpness > cutoff).squeeze(1)


def topk_select(loss_before: torch.Tensor, loss_after: torch.Tensor, k: int) -> torch.Tensor:
    """The obvious one-liner: ``topk`` indices (no tie-order guarantee, but exactly k and no sync)."""
    return torch.topk(loss_after - loss_before, k).indices


# --------------------------------------------------------------------------------------------
# plain foreach formulations (traceable by torch.compile)
# --------------------------------------------------------------------------------------------

def foreach_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def foreach_first_step(params, grads, backups, rho: float, eps: float = 1e-12) -> None:
    """``backup = w; w += rho * g / (||g|| + eps)``."""
    scale = rho / (foreach_grad_norm(grads) + eps)
    torch._foreach_copy_(backups, params)
    torch._foreach_add_(params, torch._foreach_mul(grads, scale))


def foreach_restore_sgd_step(params, grads, backups, bufs, lr: float, momentum: float, weight_decay: float) -> None:
    """``w = backup``, then SGD with momentum and weight decay (buffers already initialised)."""
    torch._foreach_copy_(params, backups)
    d = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    torch._foreach_add_(params, bufs, alpha=-lr)


def foreach_restore_adamw_step(params, grads, backups, exp_avgs, exp_avg_sqs, step: torch.Tensor, lr: float,
                               beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """``w = backup``, then AdamW; ``step`` is one 0-dim tensor counter shared by the list."""
    torch._foreach_copy_(params, backups)
    step.add_(1)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1 - beta2 ** step).sqrt())
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, -step_size)
    torch._foreach_add_(params, update)
