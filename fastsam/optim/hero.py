"""HERO: Hessian-Enhanced Robust Optimization (Yang, Yang, Gong & Chen, "HERO: Hessian-Enhanced Robust
Optimization for Unifying and Improving Generalization and Quantization Performance", DAC 2022,
arXiv:2111.11986; the authors' code: Xiaoxuan-Yang/HERO, ``cifar_hero.py``).

HERO makes the weights robust to a bounded perturbation (which the paper ties to both generalisation
and fixed-point quantisation) by penalising how much the gradient changes under SAM's perturbation,
a first-order handle on the Hessian ``H`` along ``e``: ``g(w + e) - g(w) ~ H e``. A step, as the
authors' training loop runs it:

    g      = grad L(w)                                                  (first pass)
    e      = rho T^2 g / ||T g||,  T = |w| (adaptive, the default) or 1 (ASAM's / SAM's ascent)
    g_p    = grad L(w + e)                                              (second pass, with its graph)
    R      = lmbda * sum_l mean_l((g_p,l - g_l)^2)     over the regularised tensors l (weights:
                                                       conv / linear kernels, not biases or norms)
    update = g_p + grad_w R |_(w + e)   = g_p + lmbda sum_l (2 / n_l) H(w + e) (g_p,l - g_l)
    w      = base_step(w, update)                                       (from the clean weights)

``grad_w R`` is a Hessian-vector product: autograd's double backward through the model, with ``g``
and ``e`` held constant (as the authors: ``g`` is detached, and the weights already hold ``w + e``).
The authors' script switches the term on after the first epoch: ``warmup_steps`` does the same
(``lmbda = 0`` or ``step < warmup_steps`` is plain SAM / ASAM). Their CIFAR-10 command uses
``rho = 0.5`` (their ``step_size``) and ``lmbda = 5`` with ``adaptive=True``: these are the defaults.
Their rule for "regularised" is by parameter name (no ``bias``/``bn``); here it is by shape (tensors
with more than one dimension), the same tensors for the usual conv / linear / norm models;
``regularize_1d=True`` takes every tensor.

Cost per step: two forwards, two backwards and one double backward (the Hessian-vector product),
plus one copy of the regularised gradients. The optimizer's own work is a constant number of ops per
(device, dtype) bucket: the copy of ``g`` is one fused ``restore_``, the penalty is computed on one
flat vector per bucket, and ``g_p`` is added to the product in one ``grad_mix_`` pass; the double
backward itself is the model's (per layer, like any backward). No host synchronisation.

The closure contract is the one of the optimizers that run their own passes (ESAM, δ-SAM):
``closure(indices=None)`` returns the loss (a 0-dim tensor) or per-sample losses (1-D; their mean is
used), with its graph, and does *not* call ``backward``; HERO calls it twice. ``first_step`` and
``second_step`` are inherited from SAM and give SAM's update alone (the Hessian term needs the
gradient's graph, which only the closure form has). Under fp16 loss scaling the closure's loss
carries the scale ``S``; ``step(closure, loss_scale=S)`` then weights the penalty by ``lmbda / S``
(the penalty is quadratic in the gradients, so ``S`` would otherwise reach it squared), and the
update carries ``S`` once, as a ``GradScaler`` expects. The Hugging Face integration passes it.
"""

from __future__ import annotations

import torch

from fastsam import ops

from ._variant_utils import buckets_of
from .sam import SAM, _check_nonneg


def _mean_loss(value, who: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() > 1 or value.numel() == 0:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{who}'s closure must return the loss (a 0-dim floating tensor) or per-sample losses "
                         f"(1-D), with its graph and without calling backward(); got {got}")
    if not value.requires_grad:
        raise ValueError(f"{who}'s closure returned a loss without a graph (requires_grad=False): HERO runs the "
                         "backward passes itself, so the closure must not detach the loss or run under no_grad")
    return value.mean() if value.dim() == 1 else value


def _check_warmup(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {value!r}")
    return value


class HERO(SAM):
    r"""HERO: SAM's (adaptive) perturbation plus the Hessian term ``lmbda sum_l mean((g(w+e)_l - g(w)_l)^2)``.

    Args:
        params, base_optimizer, **base_kwargs: as for :class:`fastsam.SAM`.
        rho: radius of the perturbation (the authors' ``step_size``).
        lmbda: weight of the Hessian term (the authors' ``lambda_hero``; ``>= 0``). Stored as
            ``opt.lmbda``; may be changed between steps.
        adaptive: ``T = |w|`` (the authors' default) or SAM's plain ascent.
        regularize_1d: also regularise one-dimensional tensors (biases, norm parameters).
        warmup_steps: steps taken as plain SAM before the Hessian term starts (the authors: one epoch).

    ``loss = opt.step(closure)`` runs a whole step and returns the first-pass loss::

        def closure(indices=None):
            return F.cross_entropy(model(x), y)     # no backward(): HERO differentiates twice

        loss = opt.step(closure)
    """

    _supports_sharded_params = False

    def __init__(self, params, base_optimizer, rho: float = 0.5, lmbda: float = 5.0, adaptive: bool = True, *,
                 regularize_1d: bool = False, warmup_steps: int = 0, **kwargs):
        _check_nonneg("lmbda", lmbda)
        self.warmup_steps = _check_warmup(warmup_steps)
        if kwargs.get("every", 1) != 1:
            raise ValueError("HERO runs both passes of every step: every=k (interval SAM) is not supported")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.lmbda = float(lmbda)
        self.regularize_1d = bool(regularize_1d)
        self._flat_grads: dict = {}   # (device, dtype) -> (params, flat copy of g, its views, 1/n_l per element)

    def _saved_first_grads(self, params: list) -> dict:
        """One flat buffer per bucket holding ``g`` of ``params`` (a fused copy), with per-element ``1/n_l``."""
        out = {}
        for key, bucket in buckets_of(params).items():
            cached = self._flat_grads.get(key)
            if cached is None or len(cached[0]) != len(bucket) or any(a is not b for a, b in zip(cached[0], bucket)):
                flat = torch.empty(sum(p.numel() for p in bucket), device=key[0], dtype=key[1])
                views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in bucket]), bucket)]
                counts = torch.tensor([p.numel() for p in bucket], device=key[0])
                math_dtype = torch.float64 if key[1] == torch.float64 else torch.float32
                inv_n = torch.repeat_interleave(1.0 / counts.to(math_dtype), counts)
                cached = (list(bucket), flat, views, inv_n)
                self._flat_grads[key] = cached
            ops.restore_(cached[2], [p.grad for p in bucket], backend=self.backend)
            out[key] = cached
        return out

    def step(self, closure=None, *, loss_scale=None):
        """One HERO step driven by ``closure(indices=None) -> loss``; returns the first-pass loss (detached).

        ``loss_scale``: the factor the closure's loss carries (a ``GradScaler``'s scale: a 0-dim device
        tensor or a float; see the module docstring), ``None`` for an unscaled loss.

        ``.grad`` is cleared once the closure's first output is accepted; at the end it holds the update
        ``g_p + grad R`` that the base step used. If anything raises after the perturbation, the weights
        are restored before it propagates. ``step()`` without a closure right after ``first_step``
        finishes a two-call (SAM) step.
        """
        if closure is None and self._perturbed is not None:
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError("HERO.step() needs closure(indices=None) returning the loss (with its graph, "
                               "without backward()); HERO runs the backward passes itself (see help(fastsam.HERO))")
        if self._perturbed is not None:
            raise RuntimeError("HERO.step() called between first_step() and second_step(); finish that step first")
        _check_nonneg("lmbda", self.lmbda)
        _check_warmup(self.warmup_steps)
        with torch.enable_grad():
            first = _mean_loss(closure(), "HERO")
            self.zero_grad(set_to_none=True)
            first.backward()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        hessian = self.lmbda > 0 and self._step_state.step_count >= self.warmup_steps
        regularized = [p for p in params if self.regularize_1d or p.dim() > 1] if hessian else []
        saved = self._saved_first_grads(regularized) if regularized else {}
        self.first_step(zero_grad=True, loss=first.detach())
        try:
            with torch.enable_grad():
                perturbed = _mean_loss(closure(), "HERO")
                if regularized:
                    try:
                        self._hessian_update(perturbed, params, saved, loss_scale)
                    except RuntimeError as exc:
                        if "derivative for" in str(exc) and "not implemented" in str(exc):
                            raise RuntimeError(
                                "HERO needs the model's second derivative (its Hessian term is a double backward), "
                                f"and an op of this model has none: {exc}. Use an implementation with one (for "
                                "Hugging Face models, attn_implementation='eager'); the weights were restored"
                            ) from exc
                        raise
                else:
                    perturbed.backward()
        except BaseException:
            self.restore()
            raise
        self.second_step(loss=perturbed.detach())
        return first.detach()

    def _hessian_update(self, perturbed: torch.Tensor, params: list, saved: dict, loss_scale=None) -> None:
        """``.grad = g_p + grad_w R`` at ``w + e`` (see the module docstring)."""
        gps = torch.autograd.grad(perturbed, params, create_graph=True, allow_unused=True)
        gp_of = dict(zip(params, gps))
        penalty = None
        for bucket, flat_g, _views, inv_n in saved.values():
            if any(gp_of[p] is None for p in bucket):
                raise RuntimeError("HERO: a parameter had a gradient at w but none at w + e; the closure must run "
                                   "the same computation at both points")
            flat_gp = torch.cat([gp_of[p].reshape(-1) for p in bucket])
            diff = flat_gp.to(torch.float32) - flat_g.to(torch.float32) if flat_g.dtype != torch.float64 \
                else flat_gp - flat_g
            term = (diff * diff * inv_n.to(diff.dtype)).sum()
            penalty = term if penalty is None else penalty + term.to(penalty.dtype)
        if penalty is None:  # nothing to regularise reached this pass
            for p, gp in gp_of.items():
                p.grad = None if gp is None else gp.detach()
            return
        weight = self.lmbda if loss_scale is None else self.lmbda / loss_scale
        (weight * penalty).backward(inputs=params)   # the Hessian-vector product, into .grad
        with torch.no_grad():
            both = [(p, gp.detach()) for p, gp in gp_of.items() if gp is not None]
            unreached = [(p, gp) for p, gp in both if p.grad is None]
            for p, gp in unreached:
                p.grad = gp
            mixed = [(p, gp) for p, gp in both if p.grad is not gp]
            if mixed:
                ops.grad_mix_([p.grad for p, _ in mixed], [gp for _, gp in mixed], 1.0, 1.0, backend=self.backend)

    _PICKLED = SAM._PICKLED + ("lmbda", "regularize_1d", "warmup_steps")

    def __setstate__(self, state):
        super().__setstate__(state)
        self._flat_grads = {}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", lmbda={self.lmbda}, warmup_steps={self.warmup_steps})"
