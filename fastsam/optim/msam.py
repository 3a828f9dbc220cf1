"""mSAM: micro-batch SAM (Foret et al., ICLR 2021, section 4 "m-sharpness"; Andriushchenko &
Flammarion, "Towards Understanding Sharpness-Aware Minimization", ICML 2022; Behdin et al.,
"mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization", 2023).

The batch of ``B`` samples is split into ``m`` disjoint shards of ``B / m`` consecutive samples.
Each shard gets its own perturbation from its own gradient, and the update averages the shards'
perturbed-point gradients:

    e_k = rho * g_k / (||g_k|| + eps),   g_k = grad L_k(w)            (k = 1..m)
    w   = base_step(w, mean_k grad L_k(w + e_k))

``m = 1`` is SAM. Under data parallelism with ``dp_perturbation="local"`` every rank is a shard (see
:mod:`fastsam.distributed`); ``MSAM`` on each rank then shards further.

[note: mSAM's memory does not grow with m]
The shards run one after another. Backward accumulates into ``.grad``, so the running sum of the
perturbed-point gradients lives there; during a shard's first pass that sum is set aside (the
``.grad`` attributes are swapped, nothing is copied) so the shard's own gradient lands in a fresh
``.grad`` for the perturbation, and the sum is put back before the shard's second backward adds
``grad L_k(w + e_k) / m`` to it. Compared with SAM the extra memory is that one set-aside sum,
whatever ``m``: MSAM is also SAM with gradient accumulation, for batches that do not fit at once.
Each shard's weights are restored by the in-place restore op; the last shard's restore is fused
with the base step.

[note: why the shards are a loop and not one vmapped call]
``torch.func`` can run all shards at once (``vmap`` over stacked shards with ``m`` stacked copies
of the perturbed weights). That needs ``m`` copies of the weights and gradients (the opposite of
the accumulation above), cannot update BatchNorm statistics inside ``vmap``, and turns every
convolution of the second pass into a grouped one. ``bench/bench_esam_msam_cpu.py`` measures both
on two small CNNs on CPU: the vmapped version took 1.2-2.2x SAM's step time where the loop took
0.63-1.8x (numbers in that file's docstring), so the loop is what this class does.
"""

from __future__ import annotations

import contextlib

import torch

from fastsam.distributed import second_pass, sync_context

from .esam import check_pass_driver_args, per_sample_losses
from .sam import SAM


class MSAM(SAM):
    r"""Micro-batch SAM: ``m`` shards, each perturbed by its own gradient, their perturbed-point gradients averaged.

    Args:
        params, base_optimizer, rho, adaptive, **base_kwargs: as for :class:`fastsam.SAM`.
        micro_batches: number of shards ``m`` (an int >= 1); it must divide every batch size.
        model: the module the closure runs (may be DDP-wrapped). When given, BatchNorm running
            statistics are updated once per step, by the first shard's first pass (see the note
            below). Under DDP the perturbed-point backwards
            accumulate locally and all-reduce once, at the last shard; the first-pass backwards
            all-reduce under ``dp_perturbation="global"`` (each shard then perturbs with the
            gradient of that shard across all ranks) and not under ``"local"`` (one all-reduce per
            step in all).

    ``loss = opt.step(closure, batch_size=B)`` runs a whole step; ``closure(indices=None)`` returns
    per-sample losses (1-D, graph attached) of the samples ``indices`` (a LongTensor on the device
    of the optimizer's first parameter) or of the whole batch when ``indices`` is None; the
    optimizer calls ``backward`` itself. ``batch_size`` may be omitted when ``micro_batches == 1``.
    Returns the mean first-pass loss over the batch (on the device).

    [note: why MSAM.step takes batch_size] The very first closure call already asks for a shard,
    before any returned loss could tell the optimizer how large the batch is (ESAM learns it from
    its first, full-batch pass), so the caller states it. The shard index tensors are built once
    per batch size and reused, so a step allocates and copies nothing for them.

    [note: one BatchNorm update per step] Only the first shard's first pass updates running
    statistics. ``m`` updates per step would shorten BatchNorm's averaging horizon by ``m`` and make
    the statistics depend on the micro-batching; one update matches SAM (``m = 1``) and what DDP
    keeps (rank 0's buffers are broadcast at every forward).
    """

    _supports_sharded_params = False  # not shard-aware yet (see fastsam/optim/_sharding.py)

    def __init__(self, params, base_optimizer, rho: float = 0.05, micro_batches: int = 4, adaptive: bool = False,
                 *, model=None, **kwargs):
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        check_pass_driver_args("MSAM", model, kwargs)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.micro_batches = micro_batches
        self.model = model
        self._shard_cache: dict = {}

    def _shards(self, batch_size, device) -> list:
        m = self.micro_batches
        if m == 1 and batch_size is None:
            return [None]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"MSAM.step(closure, batch_size=B) needs the batch size (an int >= 1) to split the "
                             f"batch into micro_batches={m} shards; got batch_size={batch_size!r}")
        if batch_size % m:
            raise ValueError(f"micro_batches={m} does not divide the batch size {batch_size}; use a batch size that "
                             f"is a multiple of {m} (e.g. drop_last=True) or another micro_batches")
        if m == 1:
            return [None]
        key = (batch_size, device)
        shards = self._shard_cache.get(key)
        if shards is None:  # built once per batch size: no allocation (and no host-to-device copy) per step
            shards = list(torch.arange(batch_size, device=device).view(m, batch_size // m).unbind(0))
            self._shard_cache[key] = shards
        return shards

    def _context(self, first: bool, update_stats: bool, sync: bool):
        if self.model is None:
            return contextlib.nullcontext()
        if first and update_stats:
            return sync_context(self.model, sync)
        return second_pass(self.model, sync)

    def step(self, closure=None, batch_size: int | None = None):
        """One mSAM step (see the class docstring); returns the mean first-pass loss.

        ``.grad`` is cleared once the first closure call's output is accepted (a rejected one leaves
        it alone) and holds ``mean_k grad L_k(w + e_k)`` at the end. If the closure raises while the
        weights are perturbed, they are restored first.
        """
        if closure is None and self._perturbed is not None:
            # The two-call form finished by GradScaler.step(opt), which calls step() with no closure.
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError("MSAM.step() needs closure(indices=None) returning per-sample losses; MSAM runs all "
                               "forward/backward passes itself (see help(fastsam.MSAM))")
        if self._perturbed is not None:
            raise RuntimeError("MSAM.step() called between first_step() and second_step(); finish that step first")
        params = [p for group in self.param_groups for p in group["params"]]
        if not params:
            raise ValueError("MSAM has no parameters")
        shards = self._shards(batch_size, params[0].device)
        m = len(shards)
        shard_size = None if shards[0] is None else shards[0].numel()
        local = self.dp_perturbation == "local"
        with_grad = torch.enable_grad()(closure)

        total_loss = total_perturbed = None
        accumulated: list = [None] * len(params)  # the running sum of perturbed-point gradients, set aside
        for k, indices in enumerate(shards):
            last = k == m - 1
            # First pass at w on shard k, into fresh .grad: this shard's own gradient.
            with self._context(first=True, update_stats=k == 0, sync=not local):
                losses = per_sample_losses(with_grad(indices), shard_size, "MSAM")
                if k == 0:  # cleared once the closure's output is accepted: a rejected one leaves .grad alone
                    self.zero_grad(set_to_none=True)
                losses.mean().backward()
            losses = losses.detach().mean()
            total_loss = losses if total_loss is None else total_loss + losses
            # On the last shard both losses handed over are shard means: sharpness = mean_k (L_k(w+e_k) - L_k(w)).
            self.first_step(loss=total_loss / m if last else None)
            for p, acc in zip(params, accumulated):
                p.grad = acc
            try:
                # Second pass at w + e_k, accumulated; under DDP only the last backward all-reduces.
                with self._context(first=False, update_stats=False, sync=last):
                    losses = per_sample_losses(with_grad(indices), shard_size, "MSAM").mean()
                    (losses / m if m > 1 else losses).backward()
            except BaseException:
                self.restore()
                raise
            losses = losses.detach()
            total_perturbed = losses if total_perturbed is None else total_perturbed + losses
            if last:
                self.second_step(loss=total_perturbed / m)
            else:
                self.restore()
                accumulated = [p.grad for p in params]
                for p in params:
                    p.grad = None
        return total_loss / m if m > 1 else total_loss

    _PICKLED = SAM._PICKLED + ("micro_batches", "model")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._shard_cache = {}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", micro_batches={self.micro_batches})"
