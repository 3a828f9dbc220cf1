"""Triton kernel of :func:`fastsam.ops.sds_weights`: ``softmax((loss_after - loss_before) / T)``, one launch.

The soft variant of ESAM's data selection: every sample is kept and weighted by the softmax of its
sharpness at temperature ``T`` (fp32; NaN sharpness counts as ``-inf``, weight 0). A single
program streams the batch three times (maximum, sum of exponentials, weights), always in the same
order, so the weights are reproducible; batches are small, so one program is enough.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import launch
from .sds_select import sharpness

BLOCK = 1024


@triton.jit
def _scaled_sharpness(before_ptr, after_ptr, idx, mask, temperature):
    s = sharpness(before_ptr, after_ptr, idx, mask)
    return tl.div_rn(s, temperature)


@triton.jit
def sds_weights_kernel(before_ptr, after_ptr, n, temperature, out_ptr, BLOCK: tl.constexpr):
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        running_max = tl.maximum(running_max, _scaled_sharpness(before_ptr, after_ptr, idx, idx < n, temperature))
    top = tl.max(running_max, axis=0)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = _scaled_sharpness(before_ptr, after_ptr, idx, idx < n, temperature)
        total += tl.where(idx < n, tl.exp(x - top), 0.0)
    denominator = tl.sum(total, axis=0)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = _scaled_sharpness(before_ptr, after_ptr, idx, idx < n, temperature)
        tl.store(out_ptr + idx, tl.div_rn(tl.exp(x - top), denominator), mask=idx < n)


def sds_weights(loss_before: torch.Tensor, loss_after: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 softmax weights over the batch."""
    before, after = loss_before.contiguous(), loss_after.contiguous()
    n = before.numel()
    out = torch.empty(n, dtype=torch.float32, device=before.device)
    if n == 0:  # softmax over an empty batch: no weights, and no launch (a BLOCK of 0 does not compile)
        return out
    launch(sds_weights_kernel, (1,), before, after, n, float(temperature), out,
           BLOCK=min(BLOCK, triton.next_power_of_2(n)))
    return out


@torch.library.custom_op("fastsam::sds_weights_triton", mutates_args=())
def sds_weights_op(loss_before: torch.Tensor, loss_after: torch.Tensor, temperature: float) -> torch.Tensor:
    return sds_weights(loss_before, loss_after, temperature)


@sds_weights_op.register_fake
def _(loss_before, loss_after, temperature):
    return loss_before.new_empty(loss_before.shape, dtype=torch.float32)


def sds_weights_entry(loss_before, loss_after, temperature: float) -> torch.Tensor:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        return sds_weights_op(loss_before, loss_after, float(temperature))
    return sds_weights(loss_before, loss_after, temperature)
