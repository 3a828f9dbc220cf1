"""Triton kernel of :mod:`fastsam.ops.perturb_per_tensor`: ``backup = w; w += scales[t] * g``, one launch.

One program per block of one tensor (pointer table, see ``_multi_tensor``) reads its tensor's
scale from the device vector, reads ``w`` and ``g`` once and writes the backup and the new weights:
16 bytes per fp32 element plus one scale per block, the floor for this op. A non-finite scale masks
the weight store off (the backup is still written), leaving that tensor's weights untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype


@triton.jit
def perturb_per_tensor_kernel(meta, n_tensors, scales, DTYPE: tl.constexpr, ALIGN: tl.constexpr,
                              BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, g, backup.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 6 * n_tensors + pid)
    numel = tl.load(meta + 3 * n_tensors + t)
    start = (pid - tl.load(meta + 5 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    scale = tl.load(scales + t).to(tl.float32)
    # See _multi_tensor's note on scalar conditions under the interpreter.
    finite = tl.where(tl.abs(scale) < float("inf"), tl.full([BLOCK], 1, tl.int32), 0) != 0  # inf, NaN: False
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    g_ptr += start
    b_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        w_raw = tl.load(w_ptr + offs)
        tl.store(b_ptr + offs, w_raw)
        g = tl.load(g_ptr + offs).to(tl.float32)
        tl.store(w_ptr + offs, (w_raw.to(tl.float32) + scale * g).to(w_raw.dtype), mask=finite)
    else:
        mask = offs < numel - start
        w_raw = tl.load(w_ptr + offs, mask=mask)
        tl.store(b_ptr + offs, w_raw, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(w_ptr + offs, (w_raw.to(tl.float32) + scale * g).to(w_raw.dtype), mask=mask & finite)


def perturb_per_tensor_(params, grads, backups, scales: torch.Tensor) -> None:
    """Launch ``perturb_per_tensor_kernel`` over one bucket of non-empty tensors."""
    if not params:
        return
    (ps, gs, bs), write_back = dense_lists([list(params), list(grads), list(backups)], mutated=(0, 2))
    if len(ps) != len(params):
        raise ValueError("perturb_per_tensor's Triton kernel takes non-empty tensors (the op wrapper drops empty ones)")
    device = ps[0].device
    block = block_size(device)
    tab = table([ps, gs, bs], block, split=False)  # one part: scales[t] is the table's tensor t
    scales = scales.to(device=device, dtype=torch.float32).contiguous()
    launch_table(perturb_per_tensor_kernel, tab, scales, DTYPE=tl_dtype(ps[0].dtype), BLOCK=block)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::perturb_per_tensor_triton_", mutates_args=("params", "backups"))
def perturb_per_tensor_op(params: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
                          scales: torch.Tensor) -> None:
    perturb_per_tensor_(params, grads, backups, scales)


@perturb_per_tensor_op.register_fake
def _(params, grads, backups, scales):
    return None


def perturb_per_tensor_entry(params, grads, backups, scales) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        perturb_per_tensor_op(list(params), list(grads), list(backups), scales)
    else:
        perturb_per_tensor_(params, grads, backups, scales)
