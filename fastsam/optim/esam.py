"""ESAM: Efficient Sharpness-Aware Minimization (Du et al., "Efficient Sharpness-aware Minimization
for Improved Training of Neural Networks", ICLR 2022).

Two savings on top of SAM, both exact in expectation or in the limit ``beta = gamma = 1``:

* **SWP**, stochastic weight perturbation: only a random subset of the weights is perturbed,

      e = rho * (m * g) / (beta * (||g|| + eps)),     m ~ Bernoulli(beta)

  so ``E[e]`` is SAM's perturbation.
  - ``swp="element"``: one mask bit per element, drawn inside the perturb kernel from a
    counter-based Philox stream (``fastsam.ops.perturb_``); nothing is stored, and the step's seed
    regenerates the mask on every backend. ``||g||`` is the norm of the full first-pass gradient.
  - ``swp="tensor"``: one draw per parameter tensor, as in the authors' code. An unselected
    tensor is neither perturbed nor differentiated in the step's first pass (see the note below),
    which is where this variant saves compute; ``||g||`` is then the norm over the selected
    tensors (the others' gradients are never computed) and the kept perturbation is scaled by
    ``1 / beta`` like the authors' code does.
* **SDS**, sharpness-sensitive data selection: with per-sample losses ``l_before`` (first pass at
  ``w``) and ``l_after`` (a no-grad forward at ``w + e``), the second forward/backward runs only on
  the ``k = max(1, int(gamma * B))`` samples with the largest ``l_after - l_before``
  (``fastsam.ops.sds_select``: exactly ``k``, a static shape, no host sync).

[note: ESAM's tensor-mode SWP saves the first pass's weight gradients]
In the authors' implementation the per-tensor draw sets ``requires_grad = False`` on unselected
tensors at the end of one step, so the *next* first backward skips their weight gradients (a conv
or linear layer's weight-gradient GEMM is about a third of its backward). Here the optimizer runs
the first pass itself, so it draws the selection at the start of the step, clears
``requires_grad`` on the unselected tensors for the first forward/backward only and restores the
flags right after (also when the closure raises): the same saving, without leaving the model in a
modified state between steps. The second pass differentiates every tensor, so the update uses the
full gradient at the perturbed point. In the two-call form (``first_step``/``second_step``, which
gives SWP without SDS) the first pass is the caller's, so it computes every gradient and only the
perturbation is restricted to the drawn tensors: same perturbation, no saving.

[note: SWP seeds]
The SWP draws come from a SplitMix64 generator whose whole state is ``(seed, draws)``: step ``t``
uses the Philox key ``splitmix64(seed + t * golden) >> 1`` (element mode) and tensor ``j`` is kept
iff ``splitmix64(key + j * golden) / 2**64 < beta`` (tensor mode). Both integers are in
``state_dict()``, so a resumed run draws the same masks as an uninterrupted one; ``seed`` defaults
to a draw from torch's global generator, so ``torch.manual_seed`` fixes it (and ranks that seed
torch alike draw alike). The draw counter advances only when a perturbation succeeds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fastsam import ops
from fastsam.distributed import second_pass, sync_context

from .sam import SAM, _Bucket

SWP_MODES = ("element", "tensor")

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    """One SplitMix64 output for state ``x`` (Steele, Lea & Flood, OOPSLA 2014)."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class SWPDraw:
    """One step's stochastic weight perturbation: the Philox seed and, in tensor mode, the kept tensors."""

    seed: int
    selected: frozenset  # parameters kept (tensor mode); every parameter in element mode


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def per_sample_losses(losses, expected: int | None, who: str) -> torch.Tensor:
    """Check a closure's return value: a 1-D floating tensor of per-sample losses (of length ``expected``)."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
        got = f"a tensor of shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"{who}'s closure must return per-sample losses, a 1-D floating tensor (e.g. "
                         f"F.cross_entropy(out, y, reduction='none')); got {got}")
    if losses.numel() == 0:
        raise ValueError(f"{who}'s closure returned an empty batch of losses")
    if expected is not None and losses.numel() != expected:
        raise ValueError(f"{who}'s closure returned {losses.numel()} losses where the selection asked for {expected}; "
                         "the closure must return one loss per selected sample (closure(indices))")
    return losses



def check_pass_driver_args(name: str, model, kwargs: dict) -> None:
    """Checks shared by the optimizers that run every pass of their step (ESAM, MSAM), up front."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the closure runs, got {type(model).__name__}")
    if kwargs.get("every", 1) != 1:
        raise ValueError(f"{name} runs every pass of its step itself and has no cheap steps: every=k (interval "
                         "SAM) is not supported; use fastsam.SAM(every=k) or fastsam.LookSAM")
    if kwargs.get("dp_perturbation", "global") == "local" and model is None:
        raise ValueError(f"dp_perturbation='local' needs model= (the DistributedDataParallel module) so that "
                         f"{name} can run its first-pass backward without the gradient all-reduce")


class ESAM(SAM):
    r"""ESAM: SAM with stochastic weight perturbation (SWP) and sharpness-sensitive data selection (SDS).

    Args:
        params, base_optimizer, rho, adaptive, **base_kwargs: as for :class:`fastsam.SAM`.
        beta: SWP keep probability in (0, 1]; 1 perturbs every weight.
        gamma: SDS fraction in (0, 1]; the second pass uses ``k = max(1, int(gamma * B))`` samples.
        swp: ``"element"`` (a Philox mask per element) or ``"tensor"`` (one draw per parameter
            tensor; unselected tensors skip their weight gradient in the first pass).
        seed: SWP seed (an int); ``None`` draws one from torch's global generator.
        model: the module the closure runs (may be DDP-wrapped). When given, its BatchNorm running
            statistics are updated by the first pass only (frozen in the no-grad pass and in the
            second pass), and under ``dp_perturbation="local"`` the first backward skips DDP's
            all-reduce. Without it every pass updates BatchNorm statistics.

    ``loss = opt.step(closure)`` runs a whole step. ``closure(indices=None)`` returns the per-sample
    losses (1-D, graph attached when gradients are enabled) of the current batch, or of the samples
    ``indices`` (a LongTensor on the losses' device) when given; it must not call ``backward`` or
    zero gradients, the optimizer does both::

        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")

        loss = opt.step(closure)     # mean first-pass loss, on the device

    The step: clear the gradients; full forward/backward at ``w`` (``l_before``); SWP perturbation;
    no-grad forward at ``w + e`` (``l_after``, skipped when ``k == B``); forward/backward on the
    ``k`` selected samples; restore and base step. ``beta = gamma = 1`` is exactly SAM. The
    two-call form ``first_step()``/``second_step()`` remains available and gives SWP without SDS.

    [note: two closure contracts] :meth:`SAM.step`'s closure runs only the second
    forward/backward, after the caller's first one. ``ESAM.step`` (like ``MSAM.step``) owns the
    whole step, so its closure computes losses and nothing else; a SAM-style closure returning a
    scalar is rejected with a clear error before any gradient is touched.

    Under DDP, ``swp="tensor"`` with ``dp_perturbation="global"`` needs
    ``DistributedDataParallel(..., find_unused_parameters=True)`` (unselected tensors get no
    gradient in the synchronised first backward) and the same ``seed`` on every rank; with
    ``"local"`` the first backward is not synchronised and neither is needed.
    """

    _supports_sharded_params = False  # not shard-aware yet (see fastsam/optim/_sharding.py)

    def __init__(self, params, base_optimizer, rho: float = 0.05, beta: float = 0.5, gamma: float = 0.5,
                 swp: str = "element", adaptive: bool = False, *, seed: int | None = None, model=None, **kwargs):
        beta = check_fraction("beta", beta)
        gamma = check_fraction("gamma", gamma)
        if swp not in SWP_MODES:
            raise ValueError(f"swp must be one of {SWP_MODES}, got {swp!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        check_pass_driver_args("ESAM", model, kwargs)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.beta, self.gamma, self.swp, self.model = beta, gamma, swp, model
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self._swp_seed = seed & _M64
        self._swp_draws = 0
        self.last_swp_draw: SWPDraw | None = None
        self._current_draw: SWPDraw | None = None

    # ------------------------------------------------------------------ SWP

    def _all_params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    def swp_draw(self, index: int | None = None) -> SWPDraw:
        """The SWP draw of step ``index`` (default: the next step's); a pure function of the generator state."""
        t = self._swp_draws if index is None else index
        key = _splitmix64((self._swp_seed + t * _GOLDEN) & _M64) >> 1
        params = self._all_params()
        if self.swp == "element" or self.beta >= 1.0:
            return SWPDraw(key, frozenset(params))
        threshold = self.beta * 2.0 ** 64
        kept = [p for j, p in enumerate(params) if _splitmix64((key + j * _GOLDEN) & _M64) < threshold]
        return SWPDraw(key, frozenset(kept))

    def _swp_args(self, bucket: _Bucket, offset: int) -> tuple[float, int, int]:
        if self.swp == "element" and self.beta < 1.0:
            return self.beta, self._current_draw.seed, offset
        return 1.0, 0, offset

    def _perturbation_buckets(self) -> list[_Bucket]:
        buckets = super()._perturbation_buckets()
        if self.swp != "tensor" or self.beta >= 1.0:
            return buckets
        kept = self._current_draw.selected
        out = []
        for b in buckets:
            pairs = [(p, g) for p, g in zip(b.params, b.grads) if p in kept]
            if pairs:
                b.params, b.grads = [p for p, _ in pairs], [g for _, g in pairs]
                b.rho = b.rho / self.beta  # the authors' scaling of the kept tensors' perturbation
                out.append(b)
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler=None, loss=None) -> None:
        """SWP perturbation ``w -> w + e`` from the gradients in ``.grad`` (see the module docstring)."""
        if self._perturbed is not None:
            super().first_step(zero_grad, grad_scaler=grad_scaler, loss=loss)  # raises the "called twice" error
        self._current_draw = self.swp_draw()
        try:
            super().first_step(zero_grad, grad_scaler=grad_scaler, loss=loss)
        finally:
            draw, self._current_draw = self._current_draw, None
        # Only a perturbation that happened consumes a draw (a rejected step leaves the stream as it was).
        self._swp_draws += 1
        self.last_swp_draw = draw

    # ------------------------------------------------------------------ the ESAM step

    def _first_pass_context(self):
        return sync_context(self.model, sync=self.dp_perturbation == "global")

    def _perturbed_pass_context(self, sync: bool = True):
        return second_pass(self.model, sync) if self.model is not None else contextlib.nullcontext()

    def step(self, closure=None):
        """One ESAM step driven by ``closure(indices=None) -> per-sample losses``; returns the mean first-pass loss.

        ``.grad`` is cleared once the first closure call's output is accepted (a rejected one leaves
        it as it was); at the end it holds the gradient at ``w + e`` on the selected samples (what
        the base step used). If anything raises after the perturbation, the
        weights are restored before the exception propagates.
        """
        if closure is None and self._perturbed is not None:
            # The two-call form finished by GradScaler.step(opt), which calls step() with no closure.
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError("ESAM.step() needs closure(indices=None) returning per-sample losses; ESAM runs all "
                               "forward/backward passes itself (see help(fastsam.ESAM))")
        if self._perturbed is not None:
            raise RuntimeError("ESAM.step() called between first_step() and second_step(); finish that step first")
        with_grad = torch.enable_grad()(closure)

        # First pass at w on the whole batch. In tensor mode the unselected tensors skip their weight gradient.
        frozen = []
        if self.swp == "tensor" and self.beta < 1.0:
            kept = self.swp_draw().selected
            frozen = [p for p in self._all_params() if p.requires_grad and p not in kept]
        try:
            for p in frozen:
                p.requires_grad_(False)
            with self._first_pass_context():
                loss_before = per_sample_losses(with_grad(), None, "ESAM")
                # Cleared only once the closure's output is accepted: a rejected closure leaves .grad as it was.
                self.zero_grad(set_to_none=True)
                if loss_before.requires_grad:  # False only when tensor mode froze every tensor
                    loss_before.mean().backward()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        loss_before = loss_before.detach()
        batch = loss_before.numel()
        k = ops.sds_k(batch, self.gamma)

        self.first_step(zero_grad=True, loss=loss_before.mean())
        try:
            with self._perturbed_pass_context():
                if k < batch:
                    with torch.no_grad():
                        loss_after = per_sample_losses(closure(), batch, "ESAM")
                    indices = ops.sds_select(loss_before, loss_after, k, backend=self.backend)
                else:
                    indices = None  # every sample is kept: no selection forward needed (SAM)
                loss_selected = per_sample_losses(with_grad(indices), k, "ESAM")
                loss_selected.mean().backward()
        except BaseException:
            self.restore()
            self._swp_draws -= 1  # the step did not happen: a retry draws the same perturbation
            raise
        # sharpness: the whole batch's L(w + e) - L(w) (the no-grad pass has every sample when k < B)
        self.second_step(loss=(loss_after if k < batch else loss_selected.detach()).mean())
        return loss_before.mean()

    # ------------------------------------------------------------------ state

    _STATE_KEY = "esam_swp_generator"

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[self._STATE_KEY] = {"seed": self._swp_seed, "draws": self._swp_draws}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        gen = state_dict.pop(self._STATE_KEY, None)
        if gen is not None and not (isinstance(gen, dict) and all(
                isinstance(gen.get(k), int) and not isinstance(gen.get(k), bool) for k in ("seed", "draws"))):
            raise ValueError(f"the saved ESAM SWP generator must be {{'seed': int, 'draws': int}}, got {gen!r}")
        super().load_state_dict(state_dict)
        if gen is not None:
            self._swp_seed, self._swp_draws = int(gen["seed"]), int(gen["draws"])

    _PICKLED = SAM._PICKLED + ("beta", "gamma", "swp", "model", "_swp_seed", "_swp_draws", "last_swp_draw")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._current_draw = None

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", beta={self.beta}, gamma={self.gamma}, swp={self.swp!r})"
