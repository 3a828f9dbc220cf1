"""Triton kernel of :mod:`fastsam.ops.grad_mix`: ``x <- a x + b y`` (or the swap form), one launch.

One program per block of one tensor (pointer table, see ``_multi_tensor``) loads x and y once and
stores x (12 fp32 bytes per element) or, with ``SWAP``, ``y <- a x + b y`` and ``x <- y_old`` (16
bytes): the floor for each form. ``a``, ``b`` and the optional skip flag are read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype


@triton.jit
def _grad_mix_block(x_ptr, y_ptr, offs, mask, a, b, SWAP: tl.constexpr):
    x_raw = tl.load(x_ptr + offs, mask=mask)
    y_raw = tl.load(y_ptr + offs, mask=mask)
    mixed = a * x_raw.to(tl.float32) + b * y_raw.to(tl.float32)
    if SWAP:
        tl.store(y_ptr + offs, mixed.to(y_raw.dtype), mask=mask)
        tl.store(x_ptr + offs, y_raw, mask=mask)
    else:
        tl.store(x_ptr + offs, mixed.to(x_raw.dtype), mask=mask)


@triton.jit
def grad_mix_kernel(meta, n_tensors, a_ptr, b_ptr, skip_ptr, DTYPE: tl.constexpr, SWAP: tl.constexpr,
                    HAS_SKIP: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: x, y.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 5 * n_tensors + pid)
    numel = tl.load(meta + 2 * n_tensors + t)
    start = (pid - tl.load(meta + 4 * n_tensors + t)) * BLOCK
    x_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    y_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    a = tl.load(a_ptr).to(tl.float32)
    b = tl.load(b_ptr).to(tl.float32)
    if HAS_SKIP:
        # see _multi_tensor's note on scalar conditions under the interpreter
        keep = tl.where(tl.load(skip_ptr) == 0, tl.full([BLOCK], 1, tl.int32), 0) != 0
    else:
        keep = tl.full([BLOCK], 1, tl.int1)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _grad_mix_block(x_ptr, y_ptr, offs, keep, a, b, SWAP)
    else:
        _grad_mix_block(x_ptr, y_ptr, offs, keep & (offs < numel), a, b, SWAP)


def grad_mix_(xs, ys, a: torch.Tensor, b: torch.Tensor, swap: bool, skip: torch.Tensor | None) -> None:
    """Launch ``grad_mix_kernel`` over one bucket (see the op's backend contract)."""
    if not xs:
        return
    (x, y), write_back = dense_lists([list(xs), list(ys)], mutated=(0, 1) if swap else (0,))
    if x:
        device = x[0].device
        block = block_size(device)
        tab = table([x, y], block)
        a = a.to(device=device, dtype=torch.float32).reshape(())
        b = b.to(device=device, dtype=torch.float32).reshape(())
        skip_arg = a if skip is None else skip.to(device=device, dtype=torch.float32).reshape(())
        launch_table(grad_mix_kernel, tab, a, b, skip_arg, DTYPE=tl_dtype(x[0].dtype),
                     SWAP=bool(swap), HAS_SKIP=skip is not None, BLOCK=block)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::grad_mix_triton_", mutates_args=("xs", "ys"))
def grad_mix_op(xs: list[torch.Tensor], ys: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor, swap: bool,
                skip: torch.Tensor | None) -> None:
    grad_mix_(xs, ys, a, b, swap, skip)


@grad_mix_op.register_fake
def _(xs, ys, a, b, swap, skip):
    return None


def grad_mix_entry(xs, ys, a, b, swap, skip) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        grad_mix_op(list(xs), list(ys), a, b, bool(swap), skip)
    else:
        grad_mix_(xs, ys, a, b, swap, skip)
