"""Triton kernel of :func:`fastsam.ops.sds_select`: the ``k`` sharpest samples, in one launch.

ESAM's sharpness-sensitive data selection (Du et al., ICLR 2022) keeps the ``k`` samples with the
largest ``s_i = loss_after_i - loss_before_i``. The result must equal the torch backend's exactly:
indices ordered by decreasing ``s`` (computed in fp32), ties by lower index, NaN ranked as ``-inf``
(so after every number, and in index order among themselves and any ``-inf``).

[note: ranking by counting]
That order is a strict total order on the samples, so each sample's position in it is the number of
samples that precede it:

    rank_i = #{j : s_j > s_i  or  (s_j == s_i and j < i)}

and ``out[rank_i] = i`` for every ``rank_i < k`` writes exactly ``k`` distinct slots, no more, no
fewer, with no atomics and no second pass. ``sds_select_kernel`` gives each program a block of
``i`` and streams all ``j`` through it in tiles: one launch, any ``k``, a static output shape, and
deterministic. The work is ``B^2`` comparisons spread over ``B / BLOCK_I`` programs: negligible for
the batch sizes SDS runs on (a few thousand; about 17M comparisons at 4096) and still one launch at
65536 (4.3G comparisons; a GPU does them in well under a millisecond). A single-program sort
could not hold 65536 keys in one streaming multiprocessor's registers. Batches above 65536 go to
a stable torch sort instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import interpreted, launch

MAX_ONE_LAUNCH_BATCH = 65536


@triton.jit
def sharpness(before_ptr, after_ptr, idx, mask):
    """fp32 ``after - before`` at ``idx``; NaN and out-of-range lanes become ``-inf``."""
    s = tl.load(after_ptr + idx, mask=mask, other=0.0).to(tl.float32) - \
        tl.load(before_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask & (s == s), s, float("-inf"))


@triton.jit
def sds_select_kernel(before_ptr, after_ptr, n, k, out_ptr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    # int32 indices: n <= MAX_ONE_LAUNCH_BATCH = 65536 (the launcher sends larger batches to torch).
    # With int64 ones the O(B^2) inner loop held every index pair in two registers: 255 registers and
    # local-memory spills on sm_90 (triton 3.9).
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = i < n
    s_i = sharpness(before_ptr, after_ptr, i, mask_i)
    # Counts accumulate per (i, j-lane) and are summed once at the end: no reduction in the loop.
    counts = tl.zeros([BLOCK_I, BLOCK_J], tl.int32)
    for start in range(0, n, BLOCK_J):
        # Out-of-range j read as -inf with j >= n > i, so they never precede a real sample.
        j = start + tl.arange(0, BLOCK_J)
        s_j = sharpness(before_ptr, after_ptr, j, j < n)
        ahead = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
        counts += ahead.to(tl.int32)
    rank = tl.sum(counts, axis=1)
    tl.store(out_ptr + rank, i, mask=mask_i & (rank < k))


def tile_sizes(n: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_J): small tiles on a GPU (many programs), large ones for the interpreter.

    On a GPU a full tile is 32 x 128 comparisons over 8 warps (16 per thread and iteration: 80
    registers on sm_90/sm_80 with triton 3.7 and 3.9; 64 x 128 over 4 warps needed 255 and spilled).
    """
    cap_i, cap_j = (256, 4096) if interpreted() else (32, 128)
    p2 = triton.next_power_of_2(n)
    return min(cap_i, p2), min(cap_j, p2)


def num_warps(block_i: int, block_j: int) -> int:
    """8 warps for a full GPU tile (see :func:`tile_sizes`), 4 for the small tiles of small batches."""
    return 8 if block_i * block_j >= 4096 else 4


def sds_select(loss_before: torch.Tensor, loss_after: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64[k]) of the ``k`` sharpest samples; one launch up to 65536 samples."""
    n = loss_before.numel()
    if n > MAX_ONE_LAUNCH_BATCH:
        s = loss_after.float() - loss_before.float()
        s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
        return torch.sort(s, descending=True, stable=True).indices[:k]
    before, after = loss_before.contiguous(), loss_after.contiguous()
    out = torch.empty(k, dtype=torch.int64, device=before.device)
    block_i, block_j = tile_sizes(n)
    launch(sds_select_kernel, (triton.cdiv(n, block_i),), before, after, n, k, out, BLOCK_I=block_i,
           BLOCK_J=block_j, num_warps=num_warps(block_i, block_j))
    return out


@torch.library.custom_op("fastsam::sds_select_triton", mutates_args=())
def sds_select_op(loss_before: torch.Tensor, loss_after: torch.Tensor, k: int) -> torch.Tensor:
    return sds_select(loss_before, loss_after, k)


@sds_select_op.register_fake
def _(loss_before, loss_after, k):
    return loss_before.new_empty((k,), dtype=torch.int64)


def sds_select_entry(loss_before, loss_after, k: int) -> torch.Tensor:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        return sds_select_op(loss_before, loss_after, int(k))
    return sds_select(loss_before, loss_after, k)
