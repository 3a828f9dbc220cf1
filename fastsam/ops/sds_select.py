"""Sharpness-sensitive data selection (ESAM's SDS, Du et al., "Efficient Sharpness-aware
Minimization for Improved Training of Neural Networks", ICLR 2022).

Per sample ``i`` the sharpness estimate is ``s_i = loss_after_i - loss_before_i`` (the per-sample
loss at the perturbed weights minus the one at the current weights). ESAM's second
forward/backward runs only on the samples where the loss rises most:

* :func:`sds_select` returns the indices of the ``k`` largest ``s_i``: exactly ``k`` of them (a
  static shape, so no host sync and no recompilation), ordered by decreasing sharpness, ties
  broken by the lower index first, NaN ranked below every number. The official code's strict
  ``>`` against a threshold can keep fewer than ``k`` and needs the count on the host.
* :func:`sds_weights` is the soft variant: ``softmax(s / temperature)`` over the batch, for
  reweighting every sample instead of a hard selection (NaN get weight 0).

Backend contract: ``register("sds_select", b)``: ``fn(loss_before, loss_after, k) -> int64[k]``;
``register("sds_weights", b)``: ``fn(loss_before, loss_after, temperature) -> fp32[B]``; 1-D inputs
on one device, any float dtype, math in fp32.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import register, resolve


def sds_k(batch_size: int, gamma: float) -> int:
    """ESAM's selection size ``k = max(1, int(gamma * B))``."""
    return max(1, int(gamma * batch_size))


def _check_losses(loss_before: torch.Tensor, loss_after: torch.Tensor) -> None:
    if loss_before.dim() != 1 or loss_after.shape != loss_before.shape:
        raise ValueError(f"loss_before and loss_after must be 1-D per-sample losses of the same length, got "
                         f"{tuple(loss_before.shape)} and {tuple(loss_after.shape)}")
    if loss_before.device != loss_after.device:
        raise ValueError("loss_before and loss_after must be on the same device")
    if not (loss_before.is_floating_point() and loss_after.is_floating_point()):
        raise ValueError("per-sample losses must be floating point")


def sds_select(loss_before: torch.Tensor, loss_after: torch.Tensor, k: int, *,
               backend: str | None = "auto") -> torch.Tensor:
    """Indices (int64, length exactly ``k``) of the samples with the largest ``loss_after - loss_before``."""
    _check_losses(loss_before, loss_after)
    n = loss_before.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the batch size), got {k!r}")
    dtype = torch.promote_types(loss_before.dtype, loss_after.dtype)
    _, fn = resolve("sds_select", backend, loss_before.device, dtype if dtype != torch.float64 else torch.float32)
    return fn(loss_before.detach(), loss_after.detach(), k)


def sds_weights(loss_before: torch.Tensor, loss_after: torch.Tensor, temperature: float = 1.0, *,
                backend: str | None = "auto") -> torch.Tensor:
    """``softmax((loss_after - loss_before) / temperature)`` in fp32; sums to 1 over the batch."""
    _check_losses(loss_before, loss_after)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    _, fn = resolve("sds_weights", backend, loss_before.device, torch.float32)
    return fn(loss_before.detach(), loss_after.detach(), float(temperature))


def sharpness_fp32(loss_before: torch.Tensor, loss_after: torch.Tensor) -> torch.Tensor:
    """``loss_after - loss_before`` in fp32 with NaN mapped to -inf (ranked last)."""
    s = loss_after.float() - loss_before.float()
    return torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

@register("sds_select", "torch")
def sds_select_torch(loss_before, loss_after, k: int) -> torch.Tensor:
    # A stable descending sort keeps equal values in index order: deterministic ties on every device
    # (torch.topk makes no such promise).
    order = torch.sort(sharpness_fp32(loss_before, loss_after), descending=True, stable=True).indices
    return order[:k]


@register("sds_weights", "torch")
def sds_weights_torch(loss_before, loss_after, temperature: float) -> torch.Tensor:
    return torch.softmax(sharpness_fp32(loss_before, loss_after) / temperature, dim=0)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/sds_select.cu, csrc/sds_weights.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("sds_select", "cuda")
def sds_select_cuda(loss_before, loss_after, k: int) -> torch.Tensor:
    # Batches beyond the one-launch ranking kernel's limit fall back to the torch sort.
    return _cuda.call("sds_select", (loss_before, loss_after, int(k)), sds_select_torch, (loss_before, loss_after, k))


@register("sds_weights", "cuda")
def sds_weights_cuda(loss_before, loss_after, temperature: float) -> torch.Tensor:
    return _cuda.call("sds_weights", (loss_before, loss_after, float(temperature)), sds_weights_torch,
                      (loss_before, loss_after, temperature))


@_cuda.fake("sds_select")
def _sds_select_fake(loss_before, loss_after, k):
    return loss_before.new_empty((k,), dtype=torch.int64)


@_cuda.fake("sds_weights")
def _sds_weights_fake(loss_before, loss_after, temperature):
    return loss_before.new_empty(loss_before.shape, dtype=torch.float32)
