"""FriendlySAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024).

The authors find that SAM's generalisation comes from the batch-specific part of the gradient, and
that its full-batch part hurts. FriendlySAM removes an estimate of the full-batch gradient, an
exponential moving average ``m`` of past first-pass gradients, from the perturbation direction.
With ``g`` the gradient at ``w``:

    d = g - sigma * m                         (m from the previous steps; d = g on the first step)
    m = lmbda * m + (1 - lmbda) * g           (m = g on the first step)
    e = rho * d / (||d|| + eps)               (ASAM's T^2 d / ||T d|| with adaptive=True)

then, as in SAM, ``g' = grad L(w + e)``, restore ``w`` and step the base optimizer with ``g'``.

Same arguments as pytorch-optimizer's ``FriendlySAM`` (4.1) and the authors' code. Ops per step:
``grad_norm`` of ``g`` (finiteness only: a non-finite ``g``, e.g. an fp16 overflow, must not enter
``m``; the step is then skipped as in SAM, ``m`` untouched), :func:`fastsam.ops.ema_direction_`
(``d`` written over ``.grad`` and ``m`` updated, one pass), then SAM's ``grad_norm`` and
``perturb_`` on ``d``. No host synchronisation.

``m`` is fastsam state: ``state_dict()["fastsam"]["momentum"]`` maps each parameter's index (in
``state_dict()`` order) to its EMA tensor; a resumed run continues bit for bit.
"""

from __future__ import annotations

import torch

from fastsam import ops
from fastsam.ops.ema_direction import check_ema_args

from ._variant_utils import buckets_of, check_ops_registered, resolve_for
from .sam import SAM

_OPS = ("ema_direction", "grad_norm")


class FriendlySAM(SAM):
    r"""SAM perturbing along ``g - sigma * EMA(g)``; the API of :class:`fastsam.SAM`.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as for :class:`fastsam.SAM` (``backend``,
            ``eta``, ``perturb_eps``, ``every`` and the base optimizer's options included).
        sigma: weight of the EMA subtracted from the gradient (``>= 0``; 0 is SAM).
        lmbda: EMA factor, in ``[0, 1]`` (the paper uses 0.9 or 0.95 with sigma 1).

    ``sigma`` and ``lmbda`` are attributes (``opt.sigma``, ``opt.lmbda``), checked before every step.
    ``momentum`` maps each parameter to its EMA. After ``first_step``, ``.grad`` holds ``d`` (as in
    the authors' code); zero it before the second backward as usual. A parameter's EMA starts as a
    copy of its first gradient; if that gradient is not finite (the step is skipped), it starts at 0
    and the next finite gradient enters it with weight ``1 - lmbda``.
    """

    _supports_sharded_params = False  # not shard-aware yet (see fastsam/optim/_sharding.py)

    def __init__(self, params, base_optimizer, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 adaptive: bool = False, **kwargs):
        check_ema_args(sigma, lmbda)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        check_ops_registered("FriendlySAM", self.backend, _OPS)
        self.sigma, self.lmbda = float(sigma), float(lmbda)
        self._step_state.variant.update(momentum={})

    @property
    def momentum(self) -> dict:
        """``{parameter: EMA of its first-pass gradients}`` (absent before its first gradient)."""
        return self._step_state.variant.setdefault("momentum", {})

    def first_step(self, zero_grad: bool = False, *, grad_scaler=None, loss=None) -> None:
        """Turn ``.grad`` into ``d = g - sigma m`` (updating ``m``), then SAM's ``first_step`` along ``d``."""
        check_ema_args(self.sigma, self.lmbda)
        if self.needs_second_pass and self._perturbed is None:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"FriendlySAM does not support sparse gradients (parameter of shape "
                                       f"{tuple(p.shape)})")
            buckets = buckets_of(params)
            for op in _OPS:  # an unavailable backend raises before anything changes
                resolve_for(self.backend, op, buckets)
            if params:
                if grad_scaler is not None:
                    # m must average true gradients: unscale g before it enters the EMA (SAM would
                    # unscale d afterwards, which is the same for d but too late for m).
                    self._unscale_first_pass(self._perturbation_buckets(), grad_scaler)
                    grad_scaler = None
                self._update_direction(params, buckets)
        super().first_step(zero_grad=zero_grad, grad_scaler=grad_scaler, loss=loss)

    def _update_direction(self, params: list, buckets: dict) -> None:
        momentum = self.momentum
        sq = None
        for (device, dtype), ps in buckets.items():
            _, fn = ops.resolve("grad_norm", self.backend, device, dtype)
            part = fn([p.grad for p in ps], None, "plain", 0.0)
            sq = part if sq is None else sq + part.to(sq.device, non_blocking=True)
        skip = (~torch.isfinite(sq)).to(torch.float32)
        fresh = {id(p) for p in params if p not in momentum or momentum[p].shape != p.grad.shape
                 or momentum[p].dtype != p.grad.dtype or momentum[p].device != p.grad.device}
        for p in params:
            if id(p) in fresh:  # m starts at 0; the op with sigma = lmbda = 0 then sets m = g (exactly), d = g
                momentum[p] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        for (device, dtype), ps in buckets.items():
            _, fn = ops.resolve("ema_direction", self.backend, device, dtype)
            device_skip = skip.to(device, non_blocking=True)
            for coefs, part in (((0.0, 0.0), [p for p in ps if id(p) in fresh]),
                                ((self.sigma, self.lmbda), [p for p in ps if id(p) not in fresh])):
                if part:
                    fn([p.grad for p in part], [momentum[p] for p in part], *coefs, device_skip)

    # ------------------------------------------------------------------ state

    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        index = {p: i for i, p in enumerate(self._param_list())}
        extra["momentum"] = {index[p]: m for p, m in self.momentum.items() if p in index}
        return extra

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        params = self._param_list()
        momentum = {}
        for i, m in (extra.get("momentum") or {}).items():
            i = int(i)
            if not 0 <= i < len(params) or tuple(m.shape) != tuple(params[i].shape):
                raise ValueError(f"FriendlySAM state: momentum entry {i} does not match parameter {i} of this optimizer")
            p = params[i]
            momentum[p] = m.detach().to(device=p.device, dtype=p.dtype, copy=True)
        self._step_state.variant["momentum"] = momentum

    _PICKLED = SAM._PICKLED + ("sigma", "lmbda")
