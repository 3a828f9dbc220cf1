"""Keep BatchNorm running statistics out of SAM's second forward pass.

A SAM step runs two forward passes on the same batch; the second is at the perturbed weights and
should not count toward BatchNorm's running mean/variance (or its ``num_batches_tracked``).
Inside :func:`frozen_running_stats` every BatchNorm layer in training mode still normalises with
the batch statistics, exactly as in the first pass, but its running buffers are left untouched.

It works by clearing ``track_running_stats`` for the duration (BatchNorm then passes no running
buffers to the functional call), which, unlike setting ``momentum = 0``, also covers cumulative
averaging (``momentum=None``) and leaves ``num_batches_tracked`` alone.

    with fastsam.frozen_running_stats(model):
        loss_fn(model(x), y).backward()
    optimizer.second_step()

``disable_running_stats(model)`` / ``enable_running_stats(model)`` are the same as two calls, named
like the helpers of the widely used SAM repository so existing loops keep working.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.batchnorm import _BatchNorm

_SAVED = "_fastsam_saved_track_running_stats"


def _batchnorms(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stop every BatchNorm of ``model`` from updating its running statistics (until re-enabled)."""
    for m in _batchnorms(model):
        if not hasattr(m, _SAVED):
            setattr(m, _SAVED, m.track_running_stats)
        m.track_running_stats = False


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo :func:`disable_running_stats`."""
    for m in _batchnorms(model):
        if hasattr(m, _SAVED):
            m.track_running_stats = getattr(m, _SAVED)
            delattr(m, _SAVED)


@contextlib.contextmanager
def frozen_running_stats(model: torch.nn.Module):
    """Context manager: BatchNorm layers of ``model`` use batch statistics but update nothing."""
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
