"""Triton kernel of :mod:`fastsam.ops.sampa_extrapolate`: SAMPa's ``backup = w; w -= lr (d + wd w + mu buf)``.

One program per block of one tensor (pointer table, see ``_multi_tensor``) reads w, d (and the
momentum buffer with ``HAS_MOMENTUM``) once and writes the backup and the new weights: 16 bytes per
fp32 element, 20 with the buffer, the floor for this op. Math in fp32, one rounding at the store,
in the torch backend's order (``d + wd w``, then ``+ mu buf``, then ``w - lr * that``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype

# Eight warps (8 elements per thread in a 2048-element block): with four, fp16 with the momentum
# buffer spilled on sm_90 and sm_80 (triton 3.7 and 3.9) at 72 registers or fewer; see
# bench/results/gpuless_resources.csv for the counts with eight.
NUM_WARPS = 8


@triton.jit
def _extrapolate_block(w_ptr, d_ptr, b_ptr, m_ptr, offs, mask, lr, momentum, weight_decay,
                       HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr):
    w_raw = tl.load(w_ptr + offs, mask=mask)
    tl.store(b_ptr + offs, w_raw, mask=mask)
    w = w_raw.to(tl.float32)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        d = d + weight_decay * w
    if HAS_MOMENTUM:
        d = d + momentum * tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs, (w - lr * d).to(w_raw.dtype), mask=mask)


@triton.jit
def sampa_extrapolate_kernel(meta, n_tensors, lr, momentum, weight_decay, DTYPE: tl.constexpr, N_LISTS: tl.constexpr,
                             HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, ALIGN: tl.constexpr,
                             BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, d, backup[, buf].
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + (N_LISTS + 3) * n_tensors + pid)
    numel = tl.load(meta + N_LISTS * n_tensors + t)
    start = (pid - tl.load(meta + (N_LISTS + 2) * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    d_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    if HAS_MOMENTUM:
        m_ptr = tl.multiple_of(tl.load(meta + 3 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    else:
        m_ptr = d_ptr  # not read
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    d_ptr += start
    b_ptr += start
    m_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _extrapolate_block(w_ptr, d_ptr, b_ptr, m_ptr, offs, tl.full([BLOCK], 1, tl.int1), lr, momentum,
                           weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY)
    else:
        _extrapolate_block(w_ptr, d_ptr, b_ptr, m_ptr, offs, offs < numel - start, lr, momentum, weight_decay,
                           HAS_MOMENTUM, HAS_WEIGHT_DECAY)


def sampa_extrapolate_(params, directions, backups, bufs, lr: float, momentum: float, weight_decay: float) -> None:
    """Launch ``sampa_extrapolate_kernel`` over one bucket (see the op's backend contract)."""
    if not params:
        return
    has_momentum = bool(bufs) and momentum != 0
    lists = [list(params), list(directions), list(backups)] + ([list(bufs)] if has_momentum else [])
    lists, write_back = dense_lists(lists, mutated=(0, 2))
    if lists[0]:
        block = block_size(lists[0][0].device)
        launch_table(sampa_extrapolate_kernel, table(lists, block), float(lr), float(momentum), float(weight_decay),
                     DTYPE=tl_dtype(lists[0][0].dtype), N_LISTS=len(lists), HAS_MOMENTUM=has_momentum,
                     HAS_WEIGHT_DECAY=weight_decay != 0, BLOCK=block, num_warps=NUM_WARPS)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::sampa_extrapolate_triton_", mutates_args=("params", "backups"))
def sampa_extrapolate_op(params: list[torch.Tensor], directions: list[torch.Tensor], backups: list[torch.Tensor],
                         bufs: list[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> None:
    sampa_extrapolate_(params, directions, backups, bufs, lr, momentum, weight_decay)


@sampa_extrapolate_op.register_fake
def _(params, directions, backups, bufs, lr, momentum, weight_decay):
    return None


def sampa_extrapolate_entry(params, directions, backups, bufs, lr, momentum, weight_decay) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    args = (list(params), list(directions), list(backups), list(bufs), float(lr), float(momentum), float(weight_decay))
    if torch.compiler.is_compiling():
        sampa_extrapolate_op(*args)
    else:
        sampa_extrapolate_(*args)
