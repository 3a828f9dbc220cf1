"""The classic per-parameter SAM loop, as most training code still writes it: the baseline.

Per parameter: its own norm (stacked, then normed again), its own ``e_w`` tensor, a fresh copy of
the weights, and a restore by swapping ``p.data``. Several kernel launches and two allocations per
tensor per step, plus the host-side Python loop. Written here (not imported) so the benchmark
measures exactly this pattern; it is what fastsam replaces.
"""

from __future__ import annotations

import torch


class PerParameterSAM(torch.optim.Optimizer):
    """SAM with one Python iteration (and several kernels) per parameter tensor."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def _grad_norm(self) -> torch.Tensor:
        device = self.param_groups[0]["params"][0].device
        per_tensor = []
        for group in self.param_groups:
            weight = None
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
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "w_saved" in self.state[p]:
                    p.data = self.state[p].pop("w_saved")
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
