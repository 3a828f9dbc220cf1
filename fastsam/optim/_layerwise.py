"""The layer-wise perturbation of AWP / WT-AWP, and their mix of the two gradients.

Per parameter tensor ``l`` (a "layer"), with ``g_l`` its first-pass gradient:

    e_l = rho * ||w_l|| * g_l / (||g_l|| + eps)          (0 for the tensors that are not perturbed)

``||w_l||`` and ``||g_l||`` come from one :func:`fastsam.ops.per_tensor_norm` call per bucket (two
launches whatever the number of tensors); the scale vector ``rho ||w_l|| / (||g_l|| + eps)`` is a
few ops on a length-T device vector, and :func:`fastsam.ops.perturb_per_tensor_` applies it in one
launch. A non-finite first-pass gradient anywhere turns every scale into NaN, which the op reads as
"leave the weights untouched": no host sync (``perturbation_skipped`` is that device flag).

The update handed to the base optimizer is ``a g(w + e) + b g(w)`` with ``(a, b)`` from the
subclass (:meth:`_LayerwiseSAM._mix`); ``g(w)`` is kept in one buffer per parameter (a fused copy at
``first_step``) only when ``b != 0``, and the mix is one :func:`fastsam.ops.grad_mix_` pass writing
``.grad`` in place.
"""

from __future__ import annotations

import math

import torch

from fastsam import ops

from ._variant_utils import check_ops_registered, copy_grads_to_buffers, materialize_params, reject_sparse
from .sam import SAM, _Bucket, _check_nonneg

_OPS = ("per_tensor_norm", "perturb_per_tensor", "grad_mix", "restore")


def _params_of(spec, what: str) -> list:
    """A list of parameters from None, a module, a tensor or an iterable of tensors."""
    if spec is None:
        return []
    if isinstance(spec, torch.nn.Module):
        return list(spec.parameters())
    if isinstance(spec, torch.Tensor):
        return [spec]
    out = list(spec)
    for t in out:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be parameters (tensors), a module or None, got an element of type "
                            f"{type(t).__name__}")
    return out


class _LayerwiseSAM(SAM):
    """SAM with AWP's layer-wise relative radius; subclasses choose the gradient mix. See the module docstring."""

    _supports_sharded_params = False  # per-tensor norms of local shards are not the layer's norms

    def __init__(self, params, base_optimizer, rho: float, *, truncate=None, perturb_1d: bool = False,
                 name: str, **kwargs):
        for bad in ("adaptive", "eta"):
            if bad in kwargs:
                raise TypeError(f"{name} takes no {bad} argument: its perturbation is layer-wise relative "
                                "(rho ||w_l|| g_l / ||g_l||), not ASAM's")
        params = materialize_params(params)
        truncated = _params_of(truncate, "truncate")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        check_ops_registered(name, self.backend, _OPS)
        mine = {id(p) for p in self._param_list()}
        stray = [tuple(t.shape) for t in truncated if id(t) not in mine]
        if stray:
            raise ValueError(f"truncate names tensors that are not parameters of this optimizer (shapes {stray})")
        self._truncated = {id(t) for t in truncated}
        self.perturb_1d = bool(perturb_1d)
        # Per-step tensors (see sam.py's note on torch.compile): "plan" (per bucket: the perturbed
        # indices and their squared norms), "first_grads" (parameter -> buffer holding g(w)).
        self._step_state.variant.update(plan=None, first_grads={})

    # ------------------------------------------------------------------ hooks

    def _mix(self) -> tuple[float, float] | None:
        """``(a, b)`` of the update ``a g(w + e) + b g(w)``; None for ``g(w + e)`` itself (no buffer)."""
        return None

    def perturbs(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is perturbed: not truncated, and more than one dimension unless ``perturb_1d``."""
        return id(p) not in self._truncated and (self.perturb_1d or p.dim() > 1)

    # ------------------------------------------------------------------ perturbation

    def _global_norm(self, buckets: list[_Bucket]) -> torch.Tensor:
        """``||g||`` over every gradient, and (kept for ``_perturb``) each perturbed layer's two norms."""
        plan, total = [], None
        for b in buckets:
            keep = [i for i, p in enumerate(b.params) if self.perturbs(p)]
            kept = set(keep)
            rest = [i for i in range(len(b.params)) if i not in kept]
            order = keep + rest
            # One call, one bucket: [g of the perturbed, g of the rest, w of the perturbed].
            sq = ops.per_tensor_sq_norms([b.grads[i] for i in order] + [b.params[i] for i in keep],
                                         backend=self.backend)
            n, k = len(order), len(keep)
            part = sq[:n].sum()
            total = part if total is None else total + part.to(total.device, non_blocking=True)
            plan.append((keep, sq[:k], sq[n:]))
        self._step_state.variant["plan"] = plan
        return total.sqrt()

    def _perturb(self, buckets: list[_Bucket], norm: torch.Tensor) -> None:
        plan = self._step_state.variant.pop("plan")
        perturbed: dict = {}
        for b, (keep, g_sq, w_sq) in zip(buckets, plan):
            if not keep:
                continue
            ps = [b.params[i] for i in keep]
            backups = [self._backup_for(p) for p in ps]
            finite = torch.isfinite(norm.to(b.device, non_blocking=True))
            scales = (w_sq.sqrt() * b.rho) / (g_sq.sqrt() + self.perturb_eps)
            scales = torch.where(finite, scales, torch.full_like(scales, math.nan))
            ops.perturb_per_tensor_(ps, [b.grads[i] for i in keep], backups, scales, backend=self.backend)
            perturbed.update(zip(ps, backups))
        self._step_state.perturbed = perturbed

    # ------------------------------------------------------------------ the two steps

    def first_step(self, zero_grad: bool = False, *, grad_scaler=None, loss=None) -> None:
        """Layer-wise perturbation ``w_l += rho ||w_l|| g_l / ||g_l||``; keeps ``g(w)`` when the update mixes it."""
        mix = self._mix()
        if mix is not None:
            self._check_mix(mix)
        super().first_step(zero_grad=False, grad_scaler=grad_scaler, loss=loss)
        st = self._step_state
        if mix is not None and mix[1] != 0 and not st.cheap_pending:
            params = [p for p in self._param_list() if p.grad is not None]
            reject_sparse(type(self).__name__, params)
            st.variant["first_grads"] = copy_grads_to_buffers(self.backend, params, st.variant["first_grads"])
            st.variant["first_pass_unscaled"] = grad_scaler is not None
        else:
            st.variant["first_grads"] = {}
        if zero_grad:
            self._clear_grads()

    def _check_mix(self, mix) -> None:
        for name, v in zip(("a", "b"), mix):
            if not math.isfinite(v):
                raise ValueError(f"{type(self).__name__}: the mix coefficient {name} must be finite, got {v!r}")

    def _before_base_step(self, sam_step: bool) -> None:
        mix = self._mix()
        first = self._step_state.variant.get("first_grads") or {}
        if not sam_step or mix is None or mix[1] == 0 or not first:
            return
        self._check_mix(mix)
        params = [p for p in first if p.grad is not None]
        reject_sparse(type(self).__name__, params)
        if not params:
            return
        a, b = mix
        b = self._loss_scale_of_first(b)
        ops.grad_mix_([p.grad for p in params], [first[p] for p in params], a, b, backend=self.backend)

    def _loss_scale_of_first(self, b):
        """``b`` for ``g(w)`` carrying the same GradScaler scale as ``g(w + e)`` (see GSAM's note).

        Under a GradScaler the second-pass gradient is still scaled when ``scaler.step`` hands the
        scale over (``self.grad_scale``); the copy of ``g(w)`` is scaled unless
        ``first_step(grad_scaler=...)`` unscaled it. Scaling ``b`` by the scale (a device tensor)
        matches the two without a host sync.
        """
        if getattr(self, "found_inf", None) is None:
            return b  # no GradScaler drives this step
        first_unscaled = self._step_state.variant.get("first_pass_unscaled", False)
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None and first_unscaled:
            return grad_scale.to(torch.float32) * b
        if grad_scale is None and not first_unscaled:
            raise ValueError(f"{type(self).__name__} under a GradScaler with scaler.unscale_() before scaler.step(): "
                             "pass grad_scaler=scaler to first_step() as well, so that both passes' gradients "
                             "carry the same scale before they are mixed")
        return b

    # ------------------------------------------------------------------ state

    _PICKLED = SAM._PICKLED + ("_truncated", "perturb_1d")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        # Truncation is kept by parameter position (ids do not survive pickling).
        ids = [id(p) for p in self._param_list()]
        state.pop("_truncated", None)
        state["_truncated_positions"] = [i for i, pid in enumerate(ids) if pid in self._truncated]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict, with state and groups only
        positions = self.__dict__.pop("_truncated_positions", None)
        if positions is not None:
            params = self._param_list()
            self._truncated = {id(params[i]) for i in positions}


def check_lmbda(value) -> float:
    _check_nonneg("lmbda", value)
    if value > 1:
        raise ValueError(f"lmbda must be in [0, 1], got {value!r}")
    return float(value)
