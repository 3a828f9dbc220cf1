"""δ-SAM: Sharpness-Aware Minimization with Dynamic Reweighting (Zhou, Liu, Zhang & Chen, Findings of
EMNLP 2022, arXiv:2112.08772).

SAM takes one perturbation for the whole batch; per-instance perturbations (each sample ``i``
perturbed by its own ``rho g_i / ||g_i||``) are a stronger adversary but cost one backward per
sample. δ-SAM approximates them with one *reweighted* batch perturbation: the samples whose loss
rises most under the batch perturbation get more weight in the gradient the perturbation is taken
from. With per-sample losses ``l_i``:

    g      = grad mean_i l_i(w)                         (first pass)
    e0     = rho g / (||g|| + eps);   s_i = l_i(w + e0) - l_i(w)    (no-grad forward at w + e0)
    p      = softmax(s / temperature)                    (fastsam.ops.sds_weights; sums to 1)
    g_p    = grad sum_i p_i l_i(w)                       (the reweighted batch gradient)
    e      = rho g_p / (||g_p|| + eps)                   (the perturbation actually used)
    update = grad mean_i l_i(w + e)                      (second pass), base step at w

``temperature -> inf`` gives uniform weights, i.e. SAM; a small temperature approaches the single
sharpest sample's perturbation. [note: δ-SAM's weights] The paper's full text and code were not
available while this was written (only its abstract); the weighting above (a softmax of each
sample's loss increase under the batch perturbation, over a temperature) follows the project's
reading of it, and the tests check this formula in fp64, not the authors' implementation. (A
third-party summary of the paper describes the weights as estimated from random Gaussian weight
perturbations, with three extra forward passes and no extra backward; that estimator is not
implemented here, as its exact weighting could not be read.) Cost per step: four forwards (one without gradients) and three
backwards; the reweighted backward needs a fresh forward at ``w``, because the perturbation and
restore write the weights in place, which invalidates the first forward's saved tensors. Ops:
``grad_norm``, ``perturb_``, ``restore_``, ``sds_weights`` and the fused restore + base step.
No host synchronisation: the weights stay on the device.

The closure contract is ESAM's: ``closure(indices=None) -> per-sample losses`` (1-D, graph
attached when gradients are enabled); the optimizer runs every pass and every ``backward``.
"""

from __future__ import annotations

import contextlib
import math

import torch

from fastsam import ops
from fastsam.distributed import second_pass, sync_context

from .esam import check_pass_driver_args, per_sample_losses
from .sam import SAM


def check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


class DeltaSAM(SAM):
    r"""δ-SAM: the perturbation of a batch reweighted by ``softmax(loss increase / temperature)``.

    Args:
        params, base_optimizer, rho, adaptive, **base_kwargs: as for :class:`fastsam.SAM`
            (``adaptive=True`` takes both perturbations in ASAM's geometry).
        temperature: of the softmax over the per-sample loss increases (``> 0``). Stored as
            ``opt.temperature``; may be changed between steps.
        model: the module the closure runs (may be DDP-wrapped). When given, BatchNorm running
            statistics are updated by the first pass only (frozen in the three others).

    ``loss = opt.step(closure)`` runs a whole step and returns the mean first-pass loss::

        def closure(indices=None):
            return F.cross_entropy(model(x), y, reduction="none")

        loss = opt.step(closure)

    After a step ``last_weights`` holds the sample weights ``p`` (fp32, on the device).
    """

    _supports_sharded_params = False

    def __init__(self, params, base_optimizer, rho: float = 0.05, temperature: float = 1.0, adaptive: bool = False,
                 *, model=None, **kwargs):
        self.temperature = check_temperature(temperature)
        check_pass_driver_args("DeltaSAM", model, kwargs)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.model = model
        self.last_weights: torch.Tensor | None = None

    def _perturbed_pass_context(self):
        return second_pass(self.model) if self.model is not None else contextlib.nullcontext()

    def step(self, closure=None, *, loss_scale=None):
        """One δ-SAM step driven by ``closure(indices=None) -> per-sample losses``; returns the mean first-pass loss.

        ``loss_scale``: the factor the closure's losses carry (a ``GradScaler``'s scale, a 0-dim device
        tensor or a float), so that the sample weights come from the unscaled loss increases (a scale
        would otherwise divide the temperature). The Hugging Face integration passes it under fp16.

        ``.grad`` is cleared once the first closure call's output is accepted; at the end it holds the
        mean gradient at ``w + e``. ``step()`` without a closure right after ``first_step`` (what
        ``GradScaler.step`` does in the two-call form) finishes that step. If
        anything raises after a perturbation, the weights are restored before it propagates.
        """
        if closure is None and self._perturbed is not None:
            # The two-call form finished by GradScaler.step(opt), which calls step() with no closure.
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError("DeltaSAM.step() needs closure(indices=None) returning per-sample losses; DeltaSAM "
                               "runs all forward/backward passes itself (see help(fastsam.DeltaSAM))")
        if self._perturbed is not None:
            raise RuntimeError("DeltaSAM.step() called between first_step() and second_step(); finish that step first")
        temperature = check_temperature(self.temperature)
        with_grad = torch.enable_grad()(closure)

        # 1. First pass at w: per-sample losses and the mean's gradient g. ``.grad`` is cleared only
        #    once the closure's output is accepted (a rejected closure leaves it as it was).
        sync = self.dp_perturbation == "global"
        with sync_context(self.model, sync=sync):
            losses = per_sample_losses(with_grad(), None, "DeltaSAM")
            self.zero_grad(set_to_none=True)
            losses.mean().backward()
        loss_before = losses.detach()
        del losses
        batch = loss_before.numel()

        # 2. The loss increase of every sample under SAM's batch perturbation e0.
        self.first_step(zero_grad=True)
        try:
            with self._perturbed_pass_context(), torch.no_grad():
                loss_after = per_sample_losses(closure(), batch, "DeltaSAM")
        finally:
            self.restore()
            self._step_state.grad_norm = self._step_state.perturbation_skipped = None
        before, after = (loss_before, loss_after) if loss_scale is None else \
            (loss_before / loss_scale, loss_after / loss_scale)
        weights = ops.sds_weights(before, after, temperature, backend=self.backend)
        self.last_weights = weights

        # 3. The reweighted batch gradient at w (a fresh forward: BatchNorm statistics left alone),
        #    and the perturbation e taken from it.
        with self._perturbed_pass_context(), sync_context(self.model, sync=sync):
            losses = per_sample_losses(with_grad(), batch, "DeltaSAM")
            (losses * weights.to(losses.dtype)).sum().backward()
        del losses
        self.first_step(zero_grad=True, loss=loss_before.mean())

        # 4. The update: the mean gradient at w + e, then restore and base step.
        try:
            with self._perturbed_pass_context():
                loss_perturbed = per_sample_losses(with_grad(), batch, "DeltaSAM").mean()
                loss_perturbed.backward()
        except BaseException:
            self.restore()
            raise
        self.second_step(loss=loss_perturbed.detach())  # fills `sharpness`: L(w + e) - L(w)
        return loss_before.mean()

    _PICKLED = SAM._PICKLED + ("temperature", "model", "last_weights")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", temperature={self.temperature})"
