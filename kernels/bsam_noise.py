"""Triton kernel of :mod:`fastsam.ops.bsam_noise`: ``backup = w; w += n / sqrt(num_data * s)``, one launch.

One program per block of one tensor (pointer table, see ``_multi_tensor``) loads w and s, reads its
standard normals from the flat fp32 buffer the op drew with torch (``noise[elem_start[t] + i]``,
row ``N_LISTS + 1`` of the table: the element's place in the bucket's running count, the order of
the draw), and stores w and the backup: 24 bytes per fp32 element (w, s, n read; w, backup written),
16 without the noise, which is what reproducing the torch backend's draw bit for bit costs.

The noise slice of a tensor starts wherever the running count puts it, so its loads carry no
alignment promise (coalesced 32-bit accesses); w, s and the backup take the 128-bit path. Math in
fp32 with correctly rounded sqrt and division, as torch's ``rsqrt`` on CPU: one rounding at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype

# Eight warps (8 elements per thread in a 2048-element block): three lists plus the noise per element.
NUM_WARPS = 8


@triton.jit
def _bsam_noise_block(w_ptr, b_ptr, s_ptr, n_ptr, offs, mask, num_data):
    w_raw = tl.load(w_ptr + offs, mask=mask)
    s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    n = tl.load(n_ptr + offs, mask=mask, other=0.0)
    std = tl.div_rn(1.0, tl.sqrt_rn(s * num_data))
    tl.store(b_ptr + offs, w_raw, mask=mask)
    tl.store(w_ptr + offs, (w_raw.to(tl.float32) + std * n).to(w_raw.dtype), mask=mask)


@triton.jit
def bsam_noise_kernel(meta, n_tensors, noise_ptr, num_data, DTYPE: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, backup, s.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 6 * n_tensors + pid)
    numel = tl.load(meta + 3 * n_tensors + t)
    elem_start = tl.load(meta + 4 * n_tensors + t)
    start = (pid - tl.load(meta + 5 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    s_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    b_ptr += start
    s_ptr += start
    n_ptr = noise_ptr + elem_start + start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _bsam_noise_block(w_ptr, b_ptr, s_ptr, n_ptr, offs, tl.full([BLOCK], 1, tl.int1), num_data)
    else:
        _bsam_noise_block(w_ptr, b_ptr, s_ptr, n_ptr, offs, offs < numel - start, num_data)


def bsam_noise_(params, backups, precisions, noise: torch.Tensor, num_data: float) -> None:
    """Launch ``bsam_noise_kernel`` over one bucket; ``noise`` is the bucket's flat fp32 draw (row-major)."""
    if not params:
        return
    # Row-major order (logical_order): the draw numbers elements as the torch backend's views do.
    (w, b, s), write_back = dense_lists([list(params), list(backups), list(precisions)], mutated=(0, 1),
                                        logical_order=True)
    if w:
        device = w[0].device
        block = block_size(device)
        tab = table([w, b, s], block)
        launch_table(bsam_noise_kernel, tab, noise, float(num_data), DTYPE=tl_dtype(w[0].dtype), BLOCK=block,
                     num_warps=NUM_WARPS)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque). The noise is drawn by the
# op's backend before this call (a torch.Generator is no custom-op argument type).

@torch.library.custom_op("fastsam::bsam_noise_triton_", mutates_args=("params", "backups"))
def bsam_noise_op(params: list[torch.Tensor], backups: list[torch.Tensor], precisions: list[torch.Tensor],
                  noise: torch.Tensor, num_data: float) -> None:
    bsam_noise_(params, backups, precisions, noise, num_data)


@bsam_noise_op.register_fake
def _(params, backups, precisions, noise, num_data):
    return None


def bsam_noise_entry(params, backups, precisions, noise, num_data) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        bsam_noise_op(list(params), list(backups), list(precisions), noise, float(num_data))
    else:
        bsam_noise_(params, backups, precisions, noise, num_data)
