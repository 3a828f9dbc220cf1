"""AE-SAM (Jiang, Yang, Zhang & Kwok, "An Adaptive Policy to Employ Sharpness-Aware Minimization",
ICLR 2023): a SAM step only where the loss landscape looks sharp, a plain step elsewhere.

With ``g_t`` the first-pass gradient of step ``t`` (over all parameters of the optimizer), AE-SAM
keeps exponential moving averages of the mean and variance of ``||g_t||^2``::

    mu_t      = delta mu_{t-1} + (1 - delta) ||g_t||^2                  (mu_{-1} = 0)
    sigma2_t  = delta sigma2_{t-1} + (1 - delta) (||g_t||^2 - mu_t)^2   (sigma2_{-1} = 1e-10)
    c_t       = lambda1 + (lambda2 - lambda1) * min(t / T, 1)            (T = total_steps)
    SAM step  if ||g_t||^2 >= mu_t + c_t sqrt(sigma2_t),  else a plain base step with g_t

Defaults are the paper's CIFAR settings: ``delta = 0.9``, ``lambda1 = -1``, ``lambda2 = 1``.

[note: AE-SAM's one host synchronisation]
Whether step ``t`` needs a second forward/backward is a data-dependent branch, so the host has to
know it: ``needs_second_pass`` computes ``||g_t||^2`` on the device (one fused ``grad_norm`` op) and
reads it once (one ``.item()``, the step's only host sync; on a GPU it waits for the first backward
to finish). The EMAs are then updated on the host in fp64. The decision is made once per step and
cached, so asking again (``first_step``, ``second_step`` and ``step`` all do) costs nothing. Ask it
after the first backward; the gradients in ``.grad`` must be the unscaled ones (with a GradScaler,
``scaler.unscale_(opt)`` first). A non-finite ``||g_t||^2`` leaves the EMAs as they were and makes a
plain step (which GradScaler then skips).
"""

from __future__ import annotations

import math

import torch

from fastsam import ops

from .sam import SAM


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class AESAM(SAM):
    r"""AE-SAM: SAM when ``||g||^2`` is high against its running mean and deviation, else a plain step.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as for :class:`fastsam.SAM`.
        total_steps: ``T``, the length of training in steps (the threshold schedule runs over it).
        delta: EMA factor of the mean and variance of ``||g||^2``, in [0, 1).
        lambda1, lambda2: the threshold ``c_t`` goes linearly from ``lambda1`` to ``lambda2``.

    Loop (two-call form; ``step(closure)`` works as for interval SAM)::

        loss_fn(model(x), y).backward()
        if opt.needs_second_pass:              # one host sync: ||g||^2 against the EMAs
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    ``state_dict()["fastsam"]`` holds ``aesam_mu``, ``aesam_var`` and ``aesam_sam_steps`` besides the step
    counter. ``last_sq_grad_norm`` is the last host value of ``||g||^2``.
    """

    _supports_sharded_params = False  # the statistic is over local gradients only

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *, total_steps: int,
                 delta: float = 0.9, lambda1: float = -1.0, lambda2: float = 1.0, **kwargs):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        delta = _finite("delta", delta)
        if not 0 <= delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {delta!r}")
        lambda1, lambda2 = _finite("lambda1", lambda1), _finite("lambda2", lambda2)
        if kwargs.get("every", 1) != 1:
            raise ValueError("AESAM decides every step itself; every=k (interval SAM) is not supported")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.total_steps, self.delta, self.lambda1, self.lambda2 = total_steps, delta, lambda1, lambda2
        self._mu, self._var, self._sam_steps = 0.0, 1e-10, 0
        self._decision: tuple | None = None  # (step index, is SAM step, mu/var before the update)
        self.last_sq_grad_norm: float | None = None

    def threshold(self, step: int | None = None) -> float:
        """``c_t`` of step ``step`` (default: the coming one)."""
        t = self._step_state.step_count if step is None else step
        return self.lambda1 + (self.lambda2 - self.lambda1) * min(t / self.total_steps, 1.0)

    @property
    def needs_second_pass(self) -> bool:
        """Whether the coming step is a SAM step: ``||g||^2 >= mu + c_t sigma`` (one host sync, see the note).

        Decided from the gradients in ``.grad`` the first time it is asked in a step, then cached.
        """
        t = self._step_state.step_count
        if self._decision is not None and self._decision[0] == t:
            return self._decision[1]
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            raise RuntimeError("AESAM.needs_second_pass is decided from the first-pass gradients: call it after "
                               "the first backward (no parameter has a gradient yet)")
        if any(g.is_sparse for g in grads):
            raise RuntimeError("AESAM does not support sparse gradients")
        sq = float(ops.grad_sq_norm(grads, backend=self.backend).item())  # the one host sync of the step
        self.last_sq_grad_norm = sq
        before = (self._mu, self._var)
        if not math.isfinite(sq):
            decision = False
        else:
            mu = self.delta * self._mu + (1 - self.delta) * sq
            var = self.delta * self._var + (1 - self.delta) * (sq - mu) ** 2
            self._mu, self._var = mu, var
            decision = sq >= mu + self.threshold(t) * math.sqrt(var)
        self._decision = (t, decision, before)
        return decision

    def second_step(self, zero_grad: bool = False, **kwargs) -> None:
        t = self._step_state.step_count
        super().second_step(zero_grad, **kwargs)
        if self._decision is not None and self._decision[0] == t and self._decision[1]:
            self._sam_steps += 1

    @property
    def sam_steps(self) -> int:
        """How many of the steps so far were SAM steps."""
        return self._sam_steps

    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        extra.update(aesam_mu=self._mu, aesam_var=self._var, aesam_sam_steps=self._sam_steps)
        return extra

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self._mu = float(extra.get("aesam_mu", 0.0))
        self._var = float(extra.get("aesam_var", 1e-10))
        self._sam_steps = int(extra.get("aesam_sam_steps", 0))
        self._decision = None

    _PICKLED = SAM._PICKLED + ("total_steps", "delta", "lambda1", "lambda2", "_mu", "_var", "_sam_steps",
                               "_decision", "last_sq_grad_norm")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", total_steps={self.total_steps}, delta={self.delta}, " \
                                         f"lambda1={self.lambda1}, lambda2={self.lambda2})"
