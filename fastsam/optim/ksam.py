"""K-SAM (Ni, Chiang, Geiping, Goldblum, Wilson & Goldstein, "K-SAM: Sharpness-Aware Minimization at
the Speed of SGD", 2022): both SAM passes on the ``k`` samples of the batch with the highest loss.

One step, with per-sample losses ``l_i(w)`` of a batch of ``B`` samples::

    l      = l(w)                                 no-grad forward over the whole batch
    S      = indices of the k largest l_i         k = max(1, int(gamma * B)); fastsam.ops.sds_select
    g      = grad mean_{i in S} l_i(w)            first forward/backward, on S only
    e      = rho * g / (||g|| + eps)              SAM's perturbation (ASAM's with adaptive=True)
    g'     = grad mean_{i in S} l_i(w + e)        second forward/backward, on S only
    w      = base step with g'

Selection is exactly ``k`` indices, a static shape with no host sync (``sds_select`` with
``loss_before = 0``: ties to the lower index, NaN last). The paper picks ``k`` per task; the default
here, ``gamma = 0.5``, is ESAM's SDS fraction, so the two data-selecting variants compare alike.
With ``gamma = 1`` the step is SAM's (plus the selection forward).

BatchNorm (with ``model=``): the full-batch forward updates the running statistics, as SGD's forward
would; both passes on the subset leave them alone.
"""

from __future__ import annotations

import torch

from fastsam import ops
from fastsam.distributed import second_pass, sync_context

from .esam import check_fraction, check_pass_driver_args, per_sample_losses
from .sam import SAM


class KSAM(SAM):
    r"""K-SAM: SAM whose two forward/backward passes use only the top-``k`` loss samples of the batch.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as for :class:`fastsam.SAM`.
        gamma: fraction of the batch kept, ``k = max(1, int(gamma * B))``, in (0, 1].
        model: the module the closure runs (may be DDP-wrapped); when given, the two subset passes
            leave BatchNorm running statistics alone.

    ``loss = opt.step(closure)`` runs the whole step with ESAM's closure contract:
    ``closure(indices=None)`` returns per-sample losses (1-D) of the batch or of the samples
    ``indices``, without calling ``backward``. Returns the mean full-batch loss (device tensor).
    ``last_indices`` holds the step's selection.
    """

    _supports_sharded_params = False

    def __init__(self, params, base_optimizer, rho: float = 0.05, gamma: float = 0.5, adaptive: bool = False, *,
                 model=None, **kwargs):
        gamma = check_fraction("gamma", gamma)
        check_pass_driver_args("KSAM", model, kwargs)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.gamma, self.model = gamma, model
        self.last_indices: torch.Tensor | None = None

    def _subset_context(self, first: bool):
        if self.model is None:
            return sync_context(None, True)
        if first:  # the first subset backward: DDP averages (global) or not (local); BN statistics frozen
            return second_pass(self.model, sync=self.dp_perturbation == "global")
        return second_pass(self.model)

    def step(self, closure=None):
        """One K-SAM step driven by ``closure(indices=None) -> per-sample losses``; returns the mean batch loss.

        If anything raises after the perturbation, the weights are restored before it propagates.
        """
        if closure is None and self._perturbed is not None:
            # The two-call form finished by GradScaler.step(opt), which calls step() with no closure.
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError("KSAM.step() needs closure(indices=None) returning per-sample losses; K-SAM runs "
                               "all forward/backward passes itself (see help(fastsam.KSAM))")
        if self._perturbed is not None:
            raise RuntimeError("KSAM.step() called between first_step() and second_step(); finish that step first")
        with_grad = torch.enable_grad()(closure)
        with torch.no_grad():
            losses = per_sample_losses(closure(), None, "KSAM")
        self.zero_grad(set_to_none=True)  # once the closure's output is accepted: a rejected one leaves .grad alone
        batch = losses.numel()
        k = ops.sds_k(batch, self.gamma)
        indices = ops.sds_select(torch.zeros_like(losses), losses, k, backend=self.backend)
        self.last_indices = indices
        with self._subset_context(first=True):
            subset_loss = per_sample_losses(with_grad(indices), k, "KSAM").mean()
            subset_loss.backward()
        self.first_step(zero_grad=True, loss=subset_loss.detach())
        try:
            with self._subset_context(first=False):
                perturbed_loss = per_sample_losses(with_grad(indices), k, "KSAM").mean()
                perturbed_loss.backward()
        except BaseException:
            self.restore()
            raise
        self.second_step(loss=perturbed_loss.detach())  # sharpness on the k selected samples
        return losses.mean()

    _PICKLED = SAM._PICKLED + ("gamma", "model")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", gamma={self.gamma})"
