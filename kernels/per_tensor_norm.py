"""Triton kernels of :mod:`fastsam.ops.per_tensor_norm`: the squared norm of every tensor of a bucket.

Two launches per bucket whatever the number of tensors: ``grad_sq_norm_partials_kernel`` of
``grad_norm`` (plain mode) writes one fp32 partial sum per block, the blocks of one tensor being
consecutive (pointer table, see ``_multi_tensor``); then ``segment_sums_kernel`` runs one program
per tensor, which adds that tensor's partials in a fixed order. No atomics: bitwise reproducible,
and the result stays on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, dense_lists, launch_table, launch, table, tl_dtype
from .grad_norm import MODES, grad_sq_norm_partials_kernel

SEGMENT_BLOCK = 256


@triton.jit
def segment_sums_kernel(meta, n_tensors, partials, out, N_LISTS: tl.constexpr, ELEM_BLOCK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """``out[t]`` = the sum of tensor t's block partials (program t), in a fixed order."""
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(meta + (N_LISTS + 2) * n_tensors + t)
    numel = tl.load(meta + N_LISTS * n_tensors + t)
    n_blocks = (numel + ELEM_BLOCK - 1) // ELEM_BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_blocks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + first + offs, mask=offs < n_blocks, other=0.0)
    tl.store(out + t, tl.sum(acc, axis=0))


def per_tensor_sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Squared norms of one bucket of non-empty tensors, as a new fp32 vector on its device."""
    device = tensors[0].device
    (xs,), _ = dense_lists([list(tensors)])
    if len(xs) != len(tensors):
        raise ValueError("per_tensor_norm's Triton kernels take non-empty tensors (the op wrapper drops empty ones)")
    out = torch.empty(len(xs), dtype=torch.float32, device=device)
    block = block_size(device)
    tab = table([xs], block, split=False)  # one part: out[t] is the table's tensor t
    partials = torch.empty(tab.n_blocks, dtype=torch.float32, device=device)
    launch_table(grad_sq_norm_partials_kernel, tab, partials, 0.0, DTYPE=tl_dtype(xs[0].dtype), MODE=MODES["plain"],
                 N_LISTS=1, BLOCK=block)
    part = tab.parts[0]
    launch(segment_sums_kernel, (part.n_tensors,), part.meta, part.n_tensors, partials, out, N_LISTS=1,
           ELEM_BLOCK=block, BLOCK=SEGMENT_BLOCK)
    return out


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::per_tensor_sq_norms_triton", mutates_args=())
def per_tensor_sq_norms_op(tensors: list[torch.Tensor]) -> torch.Tensor:
    return per_tensor_sq_norms(tensors)


@per_tensor_sq_norms_op.register_fake
def _(tensors):
    return tensors[0].new_empty((len(tensors),), dtype=torch.float32)


def per_tensor_sq_norms_entry(tensors) -> torch.Tensor:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        return per_tensor_sq_norms_op(list(tensors))
    return per_tensor_sq_norms(tensors)
