"""Triton kernel of :mod:`fastsam.ops.restore`: ``w = backup`` in place, one launch per bucket.

A multi-tensor copy (pointer table, see ``_multi_tensor``): 8 bytes per fp32 element, the floor.
The values are moved as they are stored, so the restore is exact for every dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype


@triton.jit
def restore_kernel(meta, n_tensors, DTYPE: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, backup.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 5 * n_tensors + pid)
    numel = tl.load(meta + 2 * n_tensors + t)
    start = (pid - tl.load(meta + 4 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    b_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        tl.store(w_ptr + offs, tl.load(b_ptr + offs))
    else:
        mask = offs < numel - start
        tl.store(w_ptr + offs, tl.load(b_ptr + offs, mask=mask), mask=mask)


def restore_(params, backups) -> None:
    """Launch ``restore_kernel`` over one bucket."""
    if not params:
        return
    (ps, bs), write_back = dense_lists([list(params), list(backups)], mutated=(0,))
    if ps:
        block = block_size(ps[0].device)
        tab = table([ps, bs], block)
        launch_table(restore_kernel, tab, DTYPE=tl_dtype(ps[0].dtype), BLOCK=block)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::restore_triton_", mutates_args=("params",))
def restore_op(params: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
    restore_(params, backups)


@restore_op.register_fake
def _(params, backups):
    return None


def restore_entry(params, backups) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        restore_op(list(params), list(backups))
    else:
        restore_(params, backups)
