"""Fisher SAM (Kim et al., "Fisher SAM: Information Geometry and Sharpness Aware Minimisation",
ICML 2022).

The neighbourhood is an ellipsoid shaped by a diagonal Fisher approximation ``f = 1 + eta g^2``:

    e = rho * (g / f) / (sqrt(sum g^2 / f) + eps)

so directions where the gradient is already large (and the model's output distribution sensitive)
are perturbed less. The paper uses ``eta = 1`` and ``rho`` of about 0.1.

Note for mixed precision: ``f`` depends on the gradient's true scale, so unlike SAM/ASAM the
perturbation is not invariant to a loss scale; unscale the gradients before ``first_step``.
"""

from __future__ import annotations

from .sam import SAM


class FisherSAM(SAM):
    """SAM in the Fisher geometry ``f = 1 + eta g^2``; see :class:`fastsam.SAM` for the API."""

    def __init__(self, params, base_optimizer, rho: float = 0.1, eta: float = 1.0, **kwargs):
        if "adaptive" in kwargs:
            raise TypeError("FisherSAM takes no adaptive argument: FisherSAM uses the Fisher geometry, not the adaptive one")
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, eta=eta, **kwargs)

    def _norm_mode(self, group) -> str:
        return "fisher"
