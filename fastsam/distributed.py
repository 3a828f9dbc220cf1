"""Data-parallel SAM: a local or a global perturbation with ``DistributedDataParallel``.

[note: local vs global perturbation]
Under DDP every backward averages the gradients across ranks. A SAM step has two backwards, and
whether the *first* one averages decides what is being minimised:

* ``dp_perturbation="global"`` (default): the first-pass gradient is averaged, every rank perturbs
  with the same gradient ``g = mean_r g_r``, so a step equals single-process SAM on the
  concatenation of the ranks' batches (equal local batch sizes, mean-reduced losses). Two gradient
  all-reduces per step.
* ``dp_perturbation="local"``: the first backward runs under ``model.no_sync()``; rank ``r``
  perturbs with its own ``g_r`` and only the second backward averages, so the update is
  ``mean_r grad L_r(w + e_r)``: exactly mSAM with one shard per rank (Foret et al. 2021, section 4;
  Andriushchenko & Flammarion, ICML 2022, "m-sharpness"; Behdin et al. 2023, "mSAM"). One
  all-reduce per step instead of two, and the smaller-``m`` sharpness that tends to generalise better.

Every SAM-family optimizer takes ``dp_perturbation``; the optimizers that run their own passes
(:class:`fastsam.ESAM`, :class:`fastsam.MSAM`) apply it themselves when given ``model=ddp_model``.
With the two-call form, the helpers below do it::

    with fastsam.distributed.first_pass(ddp_model, optimizer):    # no all-reduce when local
        loss_fn(ddp_model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    with fastsam.distributed.second_pass(ddp_model):              # BatchNorm statistics frozen
        loss_fn(ddp_model(x), y).backward()
    optimizer.second_step(zero_grad=True)

Both helpers are no-ops around a model that is not DDP-wrapped (besides the BatchNorm freeze), so
the same loop runs in one process.
"""

from __future__ import annotations

import contextlib

import torch

from .utils.batchnorm import frozen_running_stats

DP_PERTURBATIONS = ("global", "local")


def check_dp_perturbation(value) -> str:
    if value not in DP_PERTURBATIONS:
        raise ValueError(f"dp_perturbation must be one of {DP_PERTURBATIONS}, got {value!r}")
    return value


def is_ddp(model) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def sync_context(model, sync: bool):
    """``model.no_sync()`` when ``sync`` is False and ``model`` is DDP-wrapped; otherwise nothing."""
    if not sync and is_ddp(model):
        return model.no_sync()
    return contextlib.nullcontext()


def first_pass(model, optimizer):
    """Context for the first forward/backward of a SAM step (the gradient at ``w``).

    Skips DDP's gradient all-reduce when ``optimizer.dp_perturbation == "local"``, so each rank's
    perturbation comes from its own gradient; under ``"global"`` the backward averages as usual.
    BatchNorm running statistics are updated here (this is the step's one update).
    """
    mode = check_dp_perturbation(getattr(optimizer, "dp_perturbation", "global"))
    return sync_context(model, sync=mode == "global")


@contextlib.contextmanager
def second_pass(model, sync: bool = True):
    """Context for a pass at the perturbed weights: BatchNorm running statistics are left alone.

    ``sync=False`` also skips DDP's all-reduce (for all but the last of several accumulated
    backwards, as :class:`fastsam.MSAM` does).
    """
    with frozen_running_stats(model), sync_context(model, sync):
        yield model
