"""WSAM: Sharpness-Aware Minimization with weighted sharpness (Yue et al., "Sharpness-Aware
Minimization Revisited: Weighted Sharpness as a Regularization Term", KDD 2023).

WSAM minimises ``L(w) + gamma / (1 - gamma) * (L(w + e) - L(w))``: the sharpness is a regulariser
with its own weight instead of being folded into the loss as in SAM. With ``g`` the gradient at
``w``, ``g_p`` the gradient at ``w + e`` (``e`` is SAM's, or ASAM's with ``adaptive=True``) and
``alpha = gamma / (1 - gamma)``:

* ``decouple=False``: the base optimizer steps with ``g + alpha (g_p - g) = alpha g_p + (1 - alpha) g``;
* ``decouple=True`` (default, the paper's Algorithm 1): the base optimizer steps with ``g``, and the
  sharpness term is applied after it, outside the base optimizer's preconditioning:
  ``w <- w - lr * alpha * (g_p - g)``.

``gamma = 0.5`` is ``alpha = 1``: SAM's update when not decoupled. ``max_norm`` clips ``g_p`` to that
global norm (``torch.nn.utils.clip_grad_norm_``'s coefficient ``min(1, max_norm / (||g_p|| + 1e-6))``)
before it is mixed, as pytorch-optimizer's WSAM does; the coefficient stays on the device.

Same arguments and meaning as pytorch-optimizer's ``WSAM`` (4.1), minus its ``model`` (fastsam's
BatchNorm helpers replace the closure-driven running-stats handling). Ops: ``grad_norm`` and
``perturb_`` (SAM's first step), a copy of ``g`` (``restore_``), then :func:`fastsam.ops.grad_mix_`:
one pass ``g_p, g -> g, g_p - g`` (decoupled; no buffer beyond the copy of ``g``) or
``alpha g_p + (1 - alpha) g``, and after the base step one ``w += -lr alpha (g_p - g)`` pass. With
``max_norm``, one more ``grad_norm`` of ``g_p``. No host synchronisation.
"""

from __future__ import annotations

import math

import torch

from fastsam import ops

from ._variant_utils import buckets_of, check_ops_registered, copy_grads_to_buffers, reject_sparse, resolve_for
from .sam import SAM

_OPS = ("grad_mix", "grad_norm", "restore")


def _check_gamma(gamma) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1) (the sharpness weight is gamma / (1 - gamma)), got {gamma!r}")


def _check_max_norm(max_norm) -> None:
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                 or not math.isfinite(max_norm) or max_norm <= 0):
        raise ValueError(f"max_norm must be None or a finite number > 0, got {max_norm!r}")


class WSAM(SAM):
    r"""SAM with the sharpness as a weighted regulariser; the API of :class:`fastsam.SAM`.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as for :class:`fastsam.SAM` (``backend``,
            ``eta``, ``perturb_eps``, ``every`` and the base optimizer's options included).
        gamma: sharpness weight, ``alpha = gamma / (1 - gamma)``; in ``[0, 1)``.
        decouple: apply ``- lr * alpha * (g_p - g)`` after the base step (True) or step the base
            optimizer with ``alpha g_p + (1 - alpha) g`` (False).
        max_norm: clip the perturbed-point gradient to this global norm before mixing (None: no clip).
            It clips ``.grad`` as it is: under a GradScaler, call ``scaler.unscale_(opt)`` first, as
            for ``clip_grad_norm_``.

    ``gamma``, ``decouple`` and ``max_norm`` are attributes (``opt.gamma`` ...), checked before every
    step. Parameters with a gradient only in the second pass are stepped with it as it is (clipped).
    Under a GradScaler the mix is linear in the loss scale when both passes carry the same scale
    (the default: ``first_step`` without ``grad_scaler``); the decoupled term is unscaled with the
    scaler's scale and skipped with the step.
    """

    _supports_sharded_params = False  # the copy of g and the clip norm are not shard-aware yet

    def __init__(self, params, base_optimizer, rho: float = 0.05, gamma: float = 0.9, adaptive: bool = False,
                 decouple: bool = True, max_norm: float | None = None, **kwargs):
        _check_gamma(gamma)
        _check_max_norm(max_norm)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        check_ops_registered("WSAM", self.backend, _OPS)
        self.gamma, self.decouple, self.max_norm = float(gamma), bool(decouple), max_norm
        self._step_state.variant.update(first_grads={})

    @property
    def alpha(self) -> float:
        """The sharpness weight ``gamma / (1 - gamma)``."""
        return self.gamma / (1.0 - self.gamma)

    @property
    def _first_grads(self) -> dict:
        return self._step_state.variant.setdefault("first_grads", {})

    def _check_options(self) -> None:
        _check_gamma(self.gamma)
        _check_max_norm(self.max_norm)

    def first_step(self, zero_grad: bool = False, *, grad_scaler=None, loss=None) -> None:
        """SAM's ``first_step``, keeping a copy of ``g`` for the mix in ``second_step``."""
        self._check_options()
        if grad_scaler is not None:
            raise ValueError("WSAM mixes g and g_p with both at the GradScaler's scale: call first_step() without "
                             "grad_scaler (the perturbation direction does not depend on the scale)")
        if self.needs_second_pass and self._perturbed is None:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            for op in _OPS:  # an unavailable backend raises before anything is perturbed
                resolve_for(self.backend, op, buckets_of(params))
        super().first_step(zero_grad=False, loss=loss)
        if not self._step_state.cheap_pending:
            self._step_state.variant["first_grads"] = copy_grads_to_buffers(self.backend, list(self._perturbed),
                                                                            self._first_grads)
        if zero_grad:
            self._clear_grads()

    def _clip_coefficient(self, grads: list) -> torch.Tensor | None:
        if self.max_norm is None or not grads:
            return None
        norm = None
        for (device, dtype), gs in buckets_of(grads).items():
            _, fn = ops.resolve("grad_norm", self.backend, device, dtype)
            part = fn(gs, None, "plain", 0.0)
            norm = part if norm is None else norm + part.to(norm.device, non_blocking=True)
        norm = self._reduce_sq_norm(norm).sqrt()
        return torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)

    def _before_base_step(self, sam_step: bool) -> None:
        self._check_options()
        if not sam_step:
            return
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        reject_sparse(type(self).__name__, params)
        if not params:
            return
        buckets = buckets_of(params)
        mixes = resolve_for(self.backend, "grad_mix", buckets)
        clip = self._clip_coefficient([p.grad for p in params])
        first = self._first_grads
        alpha = self.alpha
        for key, ps in buckets.items():
            device = key[0]
            c = None if clip is None else clip.to(device, non_blocking=True)
            mixed = [p for p in ps if p in first and p in self._perturbed]
            alone = [p for p in ps if not (p in first and p in self._perturbed)]
            one = torch.ones((), dtype=torch.float32, device=device) if c is None else c
            if alone and c is not None:  # no first-pass gradient: only the clip applies
                gs = [p.grad for p in alone]
                mixes[key](gs, gs, c, torch.zeros((), dtype=torch.float32, device=device), False, None)
            if not mixed:
                continue
            gs, fs = [p.grad for p in mixed], [first[p] for p in mixed]
            if self.decouple:  # .grad <- g for the base step; the buffer <- c g_p - g, the sharpness term
                mixes[key](gs, fs, one, torch.full((), -1.0, device=device), True, None)
            else:  # .grad <- alpha c g_p + (1 - alpha) g
                mixes[key](gs, fs, one * alpha, torch.full((), 1.0 - alpha, device=device), False, None)
        self._step_state.variant["sharpness_pending"] = self.decouple

    def _after_base_step(self, sam_step: bool) -> None:
        if not (sam_step and self._step_state.variant.pop("sharpness_pending", False)):
            return
        grad_scale, found_inf = self._amp_scale_args()
        skipped = self._step_state.perturbation_skipped  # a non-finite g: g_p - g is not finite either
        if skipped is not None:
            skipped = skipped.to(torch.float32)
            found_inf = skipped if found_inf is None else torch.maximum(found_inf, skipped.to(found_inf.device))
        first = self._first_grads
        alpha = self.alpha
        for group in self.param_groups:
            ps = [p for p in group["params"] if p in first and p.grad is not None]
            for (device, dtype), bucket in buckets_of(ps).items():
                lr = group["lr"]
                coef = (lr.to(device=device, dtype=torch.float32) if isinstance(lr, torch.Tensor)
                        else torch.full((), float(lr), device=device)) * -alpha
                if grad_scale is not None:  # the sharpness term carries the loss scale of both passes
                    coef = coef / grad_scale.to(device, non_blocking=True)
                skip = None if found_inf is None else found_inf.to(device, non_blocking=True)
                _, mix = ops.resolve("grad_mix", self.backend, device, dtype)
                mix([self._local(p) for p in bucket], [first[p] for p in bucket],
                    torch.ones((), dtype=torch.float32, device=device), coef, False, skip)

    _PICKLED = SAM._PICKLED + ("gamma", "decouple", "max_norm")
