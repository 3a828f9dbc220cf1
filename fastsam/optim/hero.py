"""HERO: Hessian-Enhanced Robust Optimization (Yang, Yang, Gong & Chen, "HERO: Hessian-Enhanced Robust
Optimization for Unifying and Improving Generalization and Quantization Performance", 2022,
arXiv:2111.11986).

HERO trains for robustness against a bounded weight perturbation (which the paper links to both
generalisation and fixed-point quantisation) and adds a term that penalises the loss increase the
perturbation causes, ``L(w + e) - L(w) ~ e^T g + e^T H e / 2``, i.e. the Hessian along ``e``:

    e_l    = rho * ||w_l|| * g_l / (||g_l|| + eps)          (layer-wise, as in AWP)
    min_w  L(w + e) + gamma * (L(w + e) - L(w))
    update = g(w + e) + gamma * (g(w + e) - g(w)) = (1 + gamma) g(w + e) - gamma g(w)

``gamma = 0`` is AWP. [note: HERO's update] The formula above is this implementation's reading of
the paper's objective; the paper's text and the authors' code were not available while it was
written, so it is tested against an fp64 implementation of exactly this formula, not against theirs.

Ops: ``per_tensor_norm``, ``perturb_per_tensor_``, ``restore_`` (the copy of ``g(w)``: one buffer),
``grad_mix_`` (the update, one fused pass), then the base step fused with the restore. No host sync.
"""

from __future__ import annotations

from ._layerwise import _LayerwiseSAM
from .sam import _check_nonneg


class HERO(_LayerwiseSAM):
    r"""HERO: layer-wise perturbation and the update ``(1 + gamma) g(w + e) - gamma g(w)``.

    Args:
        params, base_optimizer, **kwargs: as for :class:`fastsam.SAM`.
        rho: relative radius of the layer-wise perturbation ``rho ||w_l|| g_l / ||g_l||``.
        gamma: weight of the Hessian term ``L(w + e) - L(w)`` (``>= 0``). Stored as ``opt.gamma``.
        truncate, perturb_1d: as for :class:`fastsam.AWP`.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.01, gamma: float = 1.0, *, truncate=None,
                 perturb_1d: bool = False, **kwargs):
        _check_nonneg("gamma", gamma)
        super().__init__(params, base_optimizer, rho=rho, truncate=truncate, perturb_1d=perturb_1d, name="HERO",
                         **kwargs)
        self.gamma = float(gamma)

    def _mix(self):
        _check_nonneg("gamma", self.gamma)
        return None if self.gamma == 0 else (1.0 + self.gamma, -self.gamma)

    _PICKLED = _LayerwiseSAM._PICKLED + ("gamma",)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", gamma={self.gamma})"
