"""Triton kernel of :mod:`fastsam.ops.bsam_step`: bSAM's restore, momentum, weight and precision update, one launch.

One program per block of one tensor (pointer table, see ``_multi_tensor``) reads the backup, g_p,
m, s and h and writes w, m and s (32 fp32 bytes per element: the floor; the perturbed w it
overwrites is not read). In fp32, as the torch backend (``lerp`` in its ``weight < 0.5`` form):

    w = backup;  m = m + (1 - beta1) ((g_p + delta w) - m);  w = w - lr * (m / s)
    s = s + (1 - beta2) ((h + damping + delta) - s)

``lr`` is a float or a device scalar read by the kernel (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype

# Eight warps (8 elements per thread in a 2048-element block): six lists per element.
NUM_WARPS = 8


@triton.jit
def _bsam_step_block(w_ptr, b_ptr, g_ptr, m_ptr, s_ptr, h_ptr, offs, mask, lr, one_minus_beta1, one_minus_beta2,
                     weight_decay, s_shift):
    w_raw = tl.load(b_ptr + offs, mask=mask)
    w = w_raw.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + one_minus_beta1 * ((g + weight_decay * w) - m)
    w = w - lr * tl.div_rn(m, s)
    s = s + one_minus_beta2 * ((h + s_shift) - s)
    tl.store(w_ptr + offs, w.to(w_raw.dtype), mask=mask)
    tl.store(m_ptr + offs, m.to(w_raw.dtype), mask=mask)
    tl.store(s_ptr + offs, s.to(w_raw.dtype), mask=mask)


@triton.jit
def bsam_step_kernel(meta, n_tensors, lr_value, lr_ptr, one_minus_beta1, one_minus_beta2, weight_decay, s_shift,
                     DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, backup, g, m, s, h.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 9 * n_tensors + pid)
    numel = tl.load(meta + 6 * n_tensors + t)
    start = (pid - tl.load(meta + 8 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(meta + 3 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    s_ptr = tl.multiple_of(tl.load(meta + 4 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    h_ptr = tl.multiple_of(tl.load(meta + 5 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_value
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    b_ptr += start
    g_ptr += start
    m_ptr += start
    s_ptr += start
    h_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _bsam_step_block(w_ptr, b_ptr, g_ptr, m_ptr, s_ptr, h_ptr, offs, tl.full([BLOCK], 1, tl.int1), lr,
                         one_minus_beta1, one_minus_beta2, weight_decay, s_shift)
    else:
        _bsam_step_block(w_ptr, b_ptr, g_ptr, m_ptr, s_ptr, h_ptr, offs, offs < numel - start, lr, one_minus_beta1,
                         one_minus_beta2, weight_decay, s_shift)


def bsam_step_(params, backups, grads, momenta, precisions, scales, lr_value: float, lr_tensor, beta1: float,
               beta2: float, weight_decay: float, damping: float) -> None:
    """Launch ``bsam_step_kernel`` over one bucket; ``lr_tensor`` (if given) replaces ``lr_value``."""
    if not params:
        return
    lists, write_back = dense_lists([list(x) for x in (params, backups, grads, momenta, precisions, scales)],
                                    mutated=(0, 3, 4))
    if lists[0]:
        device = lists[0][0].device
        block = block_size(device)
        tab = table(lists, block)
        lr_arg = tab.meta if lr_tensor is None else lr_tensor.to(device=device, dtype=torch.float32).reshape(())
        launch_table(bsam_step_kernel, tab, float(lr_value), lr_arg, 1.0 - float(beta1), 1.0 - float(beta2),
                     float(weight_decay), float(damping) + float(weight_decay), DTYPE=tl_dtype(lists[0][0].dtype),
                     LR_ON_DEVICE=lr_tensor is not None, BLOCK=block, num_warps=NUM_WARPS)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::bsam_step_triton_", mutates_args=("params", "momenta", "precisions"))
def bsam_step_op(params: list[torch.Tensor], backups: list[torch.Tensor], grads: list[torch.Tensor],
                 momenta: list[torch.Tensor], precisions: list[torch.Tensor], scales: list[torch.Tensor],
                 lr_value: float, lr_tensor: torch.Tensor | None, beta1: float, beta2: float, weight_decay: float,
                 damping: float) -> None:
    bsam_step_(params, backups, grads, momenta, precisions, scales, lr_value, lr_tensor, beta1, beta2, weight_decay,
               damping)


@bsam_step_op.register_fake
def _(params, backups, grads, momenta, precisions, scales, lr_value, lr_tensor, beta1, beta2, weight_decay, damping):
    return None


def bsam_step_entry(params, backups, grads, momenta, precisions, scales, lr, beta1, beta2, weight_decay,
                    damping) -> None:
    """What the op's ``triton`` backend calls (``lr`` a float or a 0-dim tensor)."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    args = ([list(x) for x in (params, backups, grads, momenta, precisions, scales)]
            + [lr_value, lr_tensor, float(beta1), float(beta2), float(weight_decay), float(damping)])
    if torch.compiler.is_compiling():
        bsam_step_op(*args)
    else:
        bsam_step_(*args)
