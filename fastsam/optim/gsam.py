"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang et al., ICLR 2022).

SAM minimises the perturbed loss ``L(w + e)``. GSAM also lowers the *surrogate gap*
``h(w) = L(w + e) - L(w)``, a measure of sharpness, without giving up SAM's progress on the
perturbed loss. With ``g`` the gradient at ``w`` (first pass) and ``g_p`` the gradient at ``w + e``
(second pass), over the whole parameter set:

    e      = rho * g / (||g|| + eps)                  (SAM's perturbation; ASAM's with adaptive=True)
    g_perp = g - (<g, g_p> / ||g_p||^2) g_p           (the part of g orthogonal to g_p)
    update = g_p - alpha * g_perp                     (handed to the base optimizer)

``-g_perp`` is orthogonal to ``g_p``, so to first order it leaves ``L(w + e)`` alone while increasing
``L(w)``, which shrinks the gap. The paper also ties ``rho`` to the learning-rate schedule
(``rho_t`` proportional to ``lr_t``): see :class:`fastsam.RhoScheduler`.

Cost over SAM: one copy of ``g`` at ``first_step`` (and that much memory), then
:func:`fastsam.ops.grad_dot` (one fused reduction for ``<g, g_p>`` and both norms) and
:func:`fastsam.ops.gsam_combine_` (one fused pass rewriting ``g_p`` in place) at ``second_step``.
No host synchronisation: every scalar stays on the device.
"""

from __future__ import annotations

import torch

from fastsam.ops.gsam_combine import check_alpha

from ._variant_utils import (buckets_of, check_ops_registered, copy_grads_to_buffers, materialize_params,
                             reject_sparse, resolve_for, warn_if_base_option_shadowed)
from .sam import SAM


_OPS = ("grad_dot", "gsam_combine")


class GSAM(SAM):
    r"""SAM whose update ``g_p - alpha * g_perp`` also lowers the surrogate gap; API of :class:`fastsam.SAM`.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as for :class:`fastsam.SAM` (``every``,
            ``backend``, ``eta``, ``perturb_eps`` and the base optimizer's options included).
        alpha: weight of the surrogate-gap term (``>= 0``; 0 is exactly SAM). Stored as ``opt.alpha``,
            not in the param groups (those are shared with the base optimizer); it may be changed
            between steps and is checked before the next one.

    ``alpha`` always means GSAM's alpha. A base optimizer with its own ``alpha`` (``torch.optim.RMSprop``)
    gets it through the param groups (``[{"params": ps, "alpha": 0.9}]``) or by passing a built
    instance as ``base_optimizer``; otherwise it keeps its default, and GSAM warns once.

    The decomposition runs over the parameters that have a gradient in both passes; a parameter with
    a gradient only in the second pass is stepped with that gradient as it is. After ``second_step``
    of a SAM step, ``grad_stats`` holds ``(<g, g_p>, ||g||^2, ||g_p||^2)`` on the device (the cosine
    between the two gradients is a useful thing to log). If a sum is not finite the update falls back
    to SAM's ``g_p``.
    """

    _supports_sharded_params = False  # not shard-aware yet (see fastsam/optim/_sharding.py)

    def __init__(self, params, base_optimizer, rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False,
                 **kwargs):
        check_alpha(alpha)
        params = materialize_params(params)
        warn_if_base_option_shadowed("GSAM", base_optimizer, "alpha", params)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        check_ops_registered("GSAM", self.backend, _OPS)
        self.alpha = float(alpha)
        # Per-step tensors live in the step state (see sam.py's note on torch.compile):
        # "first_grads": parameter -> copy of its first-pass gradient g (buffers reused);
        # "grad_stats": (<g, g_p>, ||g||^2, ||g_p||^2) of the last SAM step.
        self._step_state.variant.update(first_grads={}, grad_stats=None)

    @property
    def _first_grads(self) -> dict:
        return self._step_state.variant.setdefault("first_grads", {})

    @property
    def grad_stats(self):
        """``(<g, g_p>, ||g||^2, ||g_p||^2)`` of the last SAM step, fp32 on the device (None before one)."""
        return self._step_state.variant.get("grad_stats")

    def first_step(self, zero_grad: bool = False, *, grad_scaler=None, loss=None) -> None:
        """SAM's ``first_step``, keeping a copy of ``g`` for the decomposition in ``second_step``."""
        check_alpha(self.alpha)  # before anything changes
        if self.needs_second_pass and self._perturbed is None:
            # Resolve the second step's ops now: an unavailable backend raises before perturbing.
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            for op in _OPS:
                resolve_for(self.backend, op, buckets_of(params))
        super().first_step(zero_grad=False, grad_scaler=grad_scaler, loss=loss)
        if not self._step_state.cheap_pending:
            self._step_state.variant["first_grads"] = copy_grads_to_buffers(self.backend, list(self._perturbed),
                                                                            self._first_grads)
            # Which loss scale the copy of g carries: none if first_step unscaled it, else the scaler's.
            self._step_state.variant["first_pass_unscaled"] = grad_scaler is not None
        if zero_grad:
            self._clear_grads()

    def _before_base_step(self, sam_step: bool) -> None:
        check_alpha(self.alpha)
        if not sam_step:
            return
        params = [p for p in self._perturbed if p.grad is not None]
        reject_sparse(type(self).__name__, params)
        if not params:
            return
        buckets = buckets_of(params)
        dots, combines = (resolve_for(self.backend, op, buckets) for op in _OPS)
        self._match_loss_scales(buckets)
        stats = None
        for key, ps in buckets.items():
            part = dots[key]([self._first_grads[p] for p in ps], [p.grad for p in ps])
            stats = part if stats is None else stats + part.to(stats.device, non_blocking=True)
        # A sum, like the squared norm: the same cross-process reduction applies.
        stats = self._reduce_sq_norm(stats)
        self._step_state.variant["grad_stats"] = stats
        for (device, dtype), ps in buckets.items():
            combines[(device, dtype)]([p.grad for p in ps], [self._first_grads[p] for p in ps],
                                      stats.to(device, non_blocking=True), self.alpha)

    def _match_loss_scales(self, buckets) -> None:
        """Make g and g_p carry the same GradScaler scale before they are mixed.

        ``g_p - alpha * g_perp`` is only right when both gradients have the same scale. Under a
        GradScaler the second-pass gradient is either still scaled (``scaler.step`` hands the scale
        over as ``self.grad_scale``) or already unscaled (``scaler.unscale_`` before clipping), and the
        copy of g is scaled unless ``first_step(grad_scaler=...)`` unscaled it.
        """
        if getattr(self, "found_inf", None) is None:
            return  # no GradScaler drives this step
        first_unscaled = self._step_state.variant.get("first_pass_unscaled", False)
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None and first_unscaled:
            for (device, _), ps in buckets.items():  # bring g_p to the true scale too, on the device
                torch._foreach_div_([p.grad for p in ps], grad_scale.to(device, non_blocking=True))
            self._step_state.variant["grads_unscaled"] = True  # the base step must not unscale again
        elif grad_scale is None and not first_unscaled:
            raise ValueError("GSAM under a GradScaler with scaler.unscale_() before scaler.step(): pass "
                             "grad_scaler=scaler to first_step() as well, so that both passes' gradients are "
                             "unscaled before they are combined")

    def _amp_scale_args(self):
        grad_scale, found_inf = super()._amp_scale_args()
        if self._step_state.variant.pop("grads_unscaled", False):
            grad_scale = None
        return grad_scale, found_inf

    _PICKLED = SAM._PICKLED + ("alpha",)
