"""Triton kernel of :mod:`fastsam.ops.restore_sgd_step`: ``w = backup`` and a ``torch.optim.SGD`` step, fused.

One pass, one launch per bucket (pointer table, see ``_multi_tensor``): read the backup, the
gradient and the momentum buffer, write the weights and the buffer (20 bytes per fp32 element with
momentum, 12 without), all math in fp32, in the order of torch's fused SGD kernel:

    w = backup;  g = g / grad_scale;  g = -g (maximize);  g += weight_decay * w
    buf = g (first step)  or  momentum * buf + (1 - dampening) * g
    g = g + momentum * buf (nesterov)  or  buf;      w -= lr * g

``lr`` (a float or a device tensor), ``grad_scale`` and ``found_inf`` are read on the device. A set
``found_inf`` keeps ``w = backup`` and leaves the buffer as it was. Unlike torch's fused kernel,
the gradients are not overwritten with their unscaled values (the op contract allows either; one
write fewer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype

# Eight warps (8 elements per thread in a 2048-element block): with four, the momentum variants took
# up to 168 registers on sm_90 and spilled (fp16/bf16 with nesterov and found-inf, triton 3.7 and 3.9);
# see bench/results/gpuless_resources.csv for the counts with eight.
NUM_WARPS = 8


@triton.jit
def _sgd_block(w_ptr, g_ptr, b_ptr, m_ptr, offs, mask, lr, momentum, one_minus_dampening, weight_decay, grad_scale,
               step_ok, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr):
    backup = tl.load(b_ptr + offs, mask=mask)
    w = backup.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * w
    if HAS_MOMENTUM:
        if FIRST:
            buf = g
        else:
            buf = momentum * tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) + one_minus_dampening * g
        tl.store(m_ptr + offs, buf.to(backup.dtype), mask=mask & step_ok)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    stepped = (w - lr * g).to(backup.dtype)
    tl.store(w_ptr + offs, tl.where(step_ok, stepped, backup), mask=mask)


@triton.jit
def restore_sgd_step_kernel(meta, n_tensors, lr_value, lr_ptr, momentum, one_minus_dampening, weight_decay,
                            grad_scale_ptr, found_inf_ptr, DTYPE: tl.constexpr, N_LISTS: tl.constexpr,
                            LR_ON_DEVICE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                            NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                            HAS_FOUND_INF: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, ALIGN: tl.constexpr,
                            BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, g, backup[, buf].
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + (N_LISTS + 3) * n_tensors + pid)
    numel = tl.load(meta + N_LISTS * n_tensors + t)
    start = (pid - tl.load(meta + (N_LISTS + 2) * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    if HAS_MOMENTUM:
        m_ptr = tl.multiple_of(tl.load(meta + 3 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    else:
        m_ptr = w_ptr  # not used
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_value
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    else:
        grad_scale = 1.0
    if HAS_FOUND_INF:
        step_ok = tl.where(tl.load(found_inf_ptr) == 0, tl.full([BLOCK], 1, tl.int32), 0) != 0
    else:
        step_ok = tl.full([BLOCK], 1, tl.int1)
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    g_ptr += start
    b_ptr += start
    m_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _sgd_block(w_ptr, g_ptr, b_ptr, m_ptr, offs, tl.full([BLOCK], 1, tl.int1), lr, momentum,
                   one_minus_dampening, weight_decay, grad_scale, step_ok, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE,
                   HAS_GRAD_SCALE, HAS_WEIGHT_DECAY)
    else:
        _sgd_block(w_ptr, g_ptr, b_ptr, m_ptr, offs, offs < numel - start, lr, momentum, one_minus_dampening, weight_decay,
                   grad_scale, step_ok, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, HAS_GRAD_SCALE, HAS_WEIGHT_DECAY)


def restore_sgd_step_(params, grads, backups, momentum_buffers, lr, lr_tensor, momentum, dampening, nesterov,
                      weight_decay, maximize, is_first_step, grad_scale, found_inf) -> None:
    """Launch ``restore_sgd_step_kernel`` over one bucket; ``lr_tensor`` (if given) replaces ``lr``."""
    if not params:
        return
    has_momentum = momentum != 0
    lists = [list(params), list(grads), list(backups)] + ([list(momentum_buffers)] if has_momentum else [])
    lists, write_back = dense_lists(lists, mutated=(0, 3))
    if lists[0]:
        device = lists[0][0].device
        block = block_size(device)
        tab = table(lists, block)
        dummy = tab.meta  # stands in for absent device scalars; never read

        def scalar(x):
            return dummy if x is None else x.to(device=device).reshape(())

        launch_table(restore_sgd_step_kernel, tab, float(lr), scalar(lr_tensor),
                     float(momentum), 1.0 - float(dampening), float(weight_decay), scalar(grad_scale), scalar(found_inf),
                     DTYPE=tl_dtype(params[0].dtype), N_LISTS=len(lists), LR_ON_DEVICE=lr_tensor is not None,
                     HAS_MOMENTUM=has_momentum, FIRST=bool(is_first_step), NESTEROV=bool(nesterov),
                     MAXIMIZE=bool(maximize), HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                     HAS_WEIGHT_DECAY=weight_decay != 0, BLOCK=block, num_warps=NUM_WARPS)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::restore_sgd_step_triton_", mutates_args=("params", "momentum_buffers"))
def restore_sgd_step_op(params: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
                        momentum_buffers: list[torch.Tensor], lr: float, lr_tensor: torch.Tensor | None,
                        momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
                        is_first_step: bool, grad_scale: torch.Tensor | None,
                        found_inf: torch.Tensor | None) -> None:
    restore_sgd_step_(params, grads, backups, momentum_buffers, lr, lr_tensor, momentum, dampening, nesterov,
                      weight_decay, maximize, is_first_step, grad_scale, found_inf)


@restore_sgd_step_op.register_fake
def _(params, grads, backups, momentum_buffers, lr, lr_tensor, momentum, dampening, nesterov, weight_decay,
      maximize, is_first_step, grad_scale, found_inf):
    return None


def restore_sgd_step_entry(params, grads, backups, momentum_buffers, lr, momentum, dampening, nesterov,
                           weight_decay, maximize, is_first_step, grad_scale, found_inf) -> None:
    """What the op's ``triton`` backend calls (``lr`` a float or a 0-dim tensor)."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    args = (list(params), list(grads), list(backups), list(momentum_buffers), lr_value, lr_tensor, float(momentum),
            float(dampening), bool(nesterov), float(weight_decay), bool(maximize), bool(is_first_step), grad_scale,
            found_inf)
    if torch.compiler.is_compiling():
        restore_sgd_step_op(*args)
    else:
        restore_sgd_step_(*args)
