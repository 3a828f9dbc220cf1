"""AWP: Adversarial Weight Perturbation with a per-layer relative radius, and WT-AWP.

AWP (Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020)
perturbs every layer ``l`` by a radius relative to its own weight norm,

    e_l = rho * ||w_l|| * g_l / (||g_l|| + eps),

and steps with the gradient at ``w + e``. The authors' code perturbs only multi-dimensional weights
(biases and normalisation parameters, the 1-D tensors, are left alone); ``perturb_1d=True``
perturbs those too.

WT-AWP (Wu, Wang, Yu & Li, "Adversarial Weight Perturbation Improves Generalization in Graph Neural
Networks", AAAI 2023) adds two changes, both options here:

* ``truncate=``: layers that are never perturbed (the paper truncates the last layer(s), e.g.
  ``truncate=model.classifier``);
* ``lmbda=``: the update is the weighted ``lmbda g(w) + (1 - lmbda) g(w + e)``.

``lmbda=0`` and no truncation is AWP. With ``lmbda > 0`` the first-pass gradient is kept in one
buffer per parameter (one fused copy at ``first_step``; nothing else is copied) and the mix is one
fused pass at ``second_step``. Ops: ``per_tensor_norm``, ``perturb_per_tensor_``, ``restore_``
(and ``grad_mix_``, ``restore_`` for the buffer with ``lmbda > 0``), then the base step fused with
the restore where fastsam has one. No host synchronisation.
"""

from __future__ import annotations

from ._layerwise import _LayerwiseSAM, check_lmbda


class AWP(_LayerwiseSAM):
    r"""Adversarial weight perturbation, layer-wise relative radius; WT-AWP with ``truncate``/``lmbda``.

    Args:
        params, base_optimizer, **kwargs: as for :class:`fastsam.SAM` (``backend``, ``every``,
            ``perturb_eps`` and the base optimizer's options).
        rho: relative radius: layer ``l`` moves by ``rho ||w_l||`` (AWP's gamma; the paper uses 5e-3).
            Param groups may set their own ``rho``.
        lmbda: WT-AWP's weight of the clean gradient in ``lmbda g(w) + (1 - lmbda) g(w + e)``, in [0, 1].
            Stored as ``opt.lmbda``; may be changed between steps.
        truncate: parameters never perturbed (a module, a tensor or an iterable of tensors).
        perturb_1d: also perturb 1-D tensors (biases, norm scales); the authors' code does not.

    Same two-call form and ``step(closure)`` as :class:`fastsam.SAM`.
    """

    def __init__(self, params, base_optimizer, rho: float = 5e-3, lmbda: float = 0.0, *, truncate=None,
                 perturb_1d: bool = False, **kwargs):
        lmbda = check_lmbda(lmbda)
        super().__init__(params, base_optimizer, rho=rho, truncate=truncate, perturb_1d=perturb_1d, name="AWP",
                         **kwargs)
        self.lmbda = lmbda

    def _mix(self):
        lmbda = check_lmbda(self.lmbda)
        return None if lmbda == 0 else (1.0 - lmbda, lmbda)

    _PICKLED = _LayerwiseSAM._PICKLED + ("lmbda",)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", lmbda={self.lmbda}, truncated={len(self._truncated)})"
