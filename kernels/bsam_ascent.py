"""Triton kernel of :mod:`fastsam.ops.bsam_ascent`: ``w = backup + rho d / s`` and ``h = sqrt(s) |g|``, one launch.

One program per block of one tensor (pointer table, see ``_multi_tensor``) reads the backup, g and
s and writes w and h (20 fp32 bytes per element: the floor; the noisy w it overwrites is not read).
``d = g``, or ``w^2 g`` with ``ADAPTIVE``. Math in fp32 with correctly rounded division and sqrt
(the torch backend's ``_foreach_div`` / ``_foreach_sqrt``), one rounding at each store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype

# Eight warps (8 elements per thread in a 2048-element block): five lists per element.
NUM_WARPS = 8


@triton.jit
def _bsam_ascent_block(w_ptr, b_ptr, g_ptr, s_ptr, h_ptr, offs, mask, rho, ADAPTIVE: tl.constexpr):
    w0_raw = tl.load(b_ptr + offs, mask=mask)
    w0 = w0_raw.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    d = g * rho
    if ADAPTIVE:
        d = d * (w0 * w0)
    tl.store(w_ptr + offs, (tl.div_rn(d, s) + w0).to(w0_raw.dtype), mask=mask)
    tl.store(h_ptr + offs, (tl.sqrt_rn(s) * tl.abs(g)).to(w0_raw.dtype), mask=mask)


@triton.jit
def bsam_ascent_kernel(meta, n_tensors, rho, DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, backup, g, s, h.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 8 * n_tensors + pid)
    numel = tl.load(meta + 5 * n_tensors + t)
    start = (pid - tl.load(meta + 7 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    s_ptr = tl.multiple_of(tl.load(meta + 3 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    h_ptr = tl.multiple_of(tl.load(meta + 4 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    b_ptr += start
    g_ptr += start
    s_ptr += start
    h_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _bsam_ascent_block(w_ptr, b_ptr, g_ptr, s_ptr, h_ptr, offs, tl.full([BLOCK], 1, tl.int1), rho, ADAPTIVE)
    else:
        _bsam_ascent_block(w_ptr, b_ptr, g_ptr, s_ptr, h_ptr, offs, offs < numel - start, rho, ADAPTIVE)


def bsam_ascent_(params, backups, grads, precisions, scales, rho: float, adaptive: bool) -> None:
    """Launch ``bsam_ascent_kernel`` over one bucket (see the op's backend contract)."""
    if not params:
        return
    lists, write_back = dense_lists([list(params), list(backups), list(grads), list(precisions), list(scales)],
                                    mutated=(0, 4))
    if lists[0]:
        device = lists[0][0].device
        block = block_size(device)
        tab = table(lists, block)
        launch_table(bsam_ascent_kernel, tab, float(rho), DTYPE=tl_dtype(lists[0][0].dtype), ADAPTIVE=bool(adaptive),
                     BLOCK=block, num_warps=NUM_WARPS)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::bsam_ascent_triton_", mutates_args=("params", "scales"))
def bsam_ascent_op(params: list[torch.Tensor], backups: list[torch.Tensor], grads: list[torch.Tensor],
                   precisions: list[torch.Tensor], scales: list[torch.Tensor], rho: float, adaptive: bool) -> None:
    bsam_ascent_(params, backups, grads, precisions, scales, rho, adaptive)


@bsam_ascent_op.register_fake
def _(params, backups, grads, precisions, scales, rho, adaptive):
    return None


def bsam_ascent_entry(params, backups, grads, precisions, scales, rho, adaptive) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        bsam_ascent_op(list(params), list(backups), list(grads), list(precisions), list(scales), float(rho),
                       bool(adaptive))
    else:
        bsam_ascent_(params, backups, grads, precisions, scales, rho, adaptive)
