"""Triton kernel of :mod:`fastsam.ops.ema_direction`: FriendlySAM's ``d = g - sigma m`` and
``m = lmbda m + (1 - lmbda) g`` in one launch.

One program per block of one tensor (pointer table, see ``_multi_tensor``) loads g and m once and
stores both: 16 fp32 bytes per element, the floor. The optional skip flag is read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype


@triton.jit
def _ema_direction_block(g_ptr, m_ptr, offs, mask, sigma, lmbda):
    g_raw = tl.load(g_ptr + offs, mask=mask)
    m_raw = tl.load(m_ptr + offs, mask=mask)
    g = g_raw.to(tl.float32)
    m = m_raw.to(tl.float32)
    tl.store(g_ptr + offs, (g - sigma * m).to(g_raw.dtype), mask=mask)
    tl.store(m_ptr + offs, (m + (1.0 - lmbda) * (g - m)).to(m_raw.dtype), mask=mask)  # torch's lerp form


@triton.jit
def ema_direction_kernel(meta, n_tensors, sigma, lmbda, skip_ptr, DTYPE: tl.constexpr, HAS_SKIP: tl.constexpr,
                         ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: g, m.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 5 * n_tensors + pid)
    numel = tl.load(meta + 2 * n_tensors + t)
    start = (pid - tl.load(meta + 4 * n_tensors + t)) * BLOCK
    g_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    if HAS_SKIP:
        # see _multi_tensor's note on scalar conditions under the interpreter
        keep = tl.where(tl.load(skip_ptr) == 0, tl.full([BLOCK], 1, tl.int32), 0) != 0
    else:
        keep = tl.full([BLOCK], 1, tl.int1)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _ema_direction_block(g_ptr, m_ptr, offs, keep, sigma, lmbda)
    else:
        _ema_direction_block(g_ptr, m_ptr, offs, keep & (offs < numel), sigma, lmbda)


def ema_direction_(grads, momenta, sigma: float, lmbda: float, skip: torch.Tensor | None) -> None:
    """Launch ``ema_direction_kernel`` over one bucket (see the op's backend contract)."""
    if not grads:
        return
    (gs, ms), write_back = dense_lists([list(grads), list(momenta)], mutated=(0, 1))
    if gs:
        device = gs[0].device
        block = block_size(device)
        tab = table([gs, ms], block)
        skip_arg = tab.meta if skip is None else skip.to(device=device, dtype=torch.float32).reshape(())
        launch_table(ema_direction_kernel, tab, float(sigma), float(lmbda), skip_arg,
                     DTYPE=tl_dtype(gs[0].dtype), HAS_SKIP=skip is not None, BLOCK=block)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::ema_direction_triton_", mutates_args=("grads", "momenta"))
def ema_direction_op(grads: list[torch.Tensor], momenta: list[torch.Tensor], sigma: float, lmbda: float,
                     skip: torch.Tensor | None) -> None:
    ema_direction_(grads, momenta, sigma, lmbda, skip)


@ema_direction_op.register_fake
def _(grads, momenta, sigma, lmbda, skip):
    return None


def ema_direction_entry(grads, momenta, sigma, lmbda, skip) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        ema_direction_op(list(grads), list(momenta), float(sigma), float(lmbda), skip)
    else:
        ema_direction_(grads, momenta, sigma, lmbda, skip)
