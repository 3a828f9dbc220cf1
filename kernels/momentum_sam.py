"""Triton kernels of :mod:`fastsam.ops.momentum_sam`: Momentum-SAM's fused step and its ascent move.

``momentum_sam_sgd_kernel`` / ``momentum_sam_adamw_kernel``: one program per block of one tensor
(pointer table, see ``_multi_tensor``) does the whole per-element update of the op's docstring in
one pass (back from the ascent point, the SGD or AdamW step; math in fp32, one rounding at each
store) and writes one fp32 partial sum of the new momentum's squares *as stored* (the rounded
values the next ascent move follows) per block. ``grad_norm.sum_tree_`` then adds the partials in a
fixed tree: no atomics, bitwise reproducible, the result stays on the device. Traffic per fp32
element: SGD reads w, g, v and writes w, v (20 bytes); AdamW reads w, g, m, u and writes w, m, u
(28 bytes); plus 4 bytes per 2048-element block of partials.

``momentum_sam_shift_kernel``: ``backup = w`` (with ``HAS_BACKUP``), ``w += scale * v``; reads w, v
and writes w (12 bytes) or also the backup (16).

``s_old`` and ``scale`` are read on the device (no host sync); ``lr`` and the AdamW bias corrections
are floats formed on the host in double, as the torch backend forms them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch, launch_table, table, tl_dtype
from .grad_norm import sum_tree_

# Eight warps (8 elements per thread in a 2048-element block), as the fused restore steps: the
# SGD form keeps three lists, AdamW four, live in fp32 per element next to the running sum
# (tests/gpuless, bench/results/gpuless_resources.csv hold the register counts).
NUM_WARPS = 8


@triton.jit
def _sgd_block(w_ptr, g_ptr, v_ptr, offs, mask, s_old, lr, momentum, weight_decay, NESTEROV: tl.constexpr,
               HAS_WEIGHT_DECAY: tl.constexpr):
    w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
    w = w_raw.to(tl.float32)  # the ascent point w~, where the gradient was taken
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        d = g + weight_decay * w
    else:
        d = g
    w = w + s_old * v
    v = momentum * v + d
    if NESTEROV:
        w = w - lr * (d + momentum * v)
    else:
        w = w - lr * v
    v_out = v.to(w_raw.dtype)
    tl.store(v_ptr + offs, v_out, mask=mask)
    tl.store(w_ptr + offs, w.to(w_raw.dtype), mask=mask)
    v_stored = tl.where(mask, v_out.to(tl.float32), 0.0)
    return tl.sum(v_stored * v_stored, axis=0)


@triton.jit
def momentum_sam_sgd_kernel(meta, n_tensors, partials, s_ptr, lr, momentum, weight_decay, DTYPE: tl.constexpr,
                            NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, ALIGN: tl.constexpr,
                            BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, g, v.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 6 * n_tensors + pid)
    numel = tl.load(meta + 3 * n_tensors + t)
    start = (pid - tl.load(meta + 5 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    v_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    s_old = tl.load(s_ptr).to(tl.float32)
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    g_ptr += start
    v_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        part = _sgd_block(w_ptr, g_ptr, v_ptr, offs, tl.full([BLOCK], 1, tl.int1), s_old, lr, momentum,
                          weight_decay, NESTEROV, HAS_WEIGHT_DECAY)
    else:
        part = _sgd_block(w_ptr, g_ptr, v_ptr, offs, offs < numel - start, s_old, lr, momentum, weight_decay,
                          NESTEROV, HAS_WEIGHT_DECAY)
    tl.store(partials + pid, part)


@triton.jit
def _adamw_block(w_ptr, g_ptr, m_ptr, u_ptr, offs, mask, s_old, step_size, one_minus_beta1, beta2,
                 one_minus_beta2, bias_correction2_sqrt, eps, decay, HAS_WEIGHT_DECAY: tl.constexpr):
    w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w_raw.to(tl.float32) + s_old * m  # back from the ascent point along the old moment
    m = m + one_minus_beta1 * (g - m)  # torch's lerp, as the torch backend's _foreach_lerp_
    u = beta2 * u + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(u), bias_correction2_sqrt) + eps
    w = w - step_size * tl.div_rn(m, denom)
    if HAS_WEIGHT_DECAY:
        w = w * decay  # decoupled decay after the Adam step (the authors' order)
    m_out = m.to(w_raw.dtype)
    tl.store(m_ptr + offs, m_out, mask=mask)
    tl.store(u_ptr + offs, u.to(w_raw.dtype), mask=mask)
    tl.store(w_ptr + offs, w.to(w_raw.dtype), mask=mask)
    m_stored = tl.where(mask, m_out.to(tl.float32), 0.0)
    return tl.sum(m_stored * m_stored, axis=0)


@triton.jit
def momentum_sam_adamw_kernel(meta, n_tensors, partials, s_ptr, step_size, one_minus_beta1, beta2, one_minus_beta2,
                              bias_correction2_sqrt, eps, decay, DTYPE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                              ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, g, m, u.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 7 * n_tensors + pid)
    numel = tl.load(meta + 4 * n_tensors + t)
    start = (pid - tl.load(meta + 6 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    u_ptr = tl.multiple_of(tl.load(meta + 3 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    s_old = tl.load(s_ptr).to(tl.float32)
    w_ptr += start
    g_ptr += start
    m_ptr += start
    u_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        part = _adamw_block(w_ptr, g_ptr, m_ptr, u_ptr, offs, tl.full([BLOCK], 1, tl.int1), s_old, step_size,
                            one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, decay,
                            HAS_WEIGHT_DECAY)
    else:
        part = _adamw_block(w_ptr, g_ptr, m_ptr, u_ptr, offs, offs < numel - start, s_old, step_size,
                            one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, decay,
                            HAS_WEIGHT_DECAY)
    tl.store(partials + pid, part)


@triton.jit
def _shift_block(w_ptr, v_ptr, b_ptr, offs, mask, scale, HAS_BACKUP: tl.constexpr):
    w_raw = tl.load(w_ptr + offs, mask=mask)
    if HAS_BACKUP:
        tl.store(b_ptr + offs, w_raw, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs, (w_raw.to(tl.float32) + scale * v).to(w_raw.dtype), mask=mask)


@triton.jit
def momentum_sam_shift_kernel(meta, n_tensors, scale_ptr, DTYPE: tl.constexpr, N_LISTS: tl.constexpr,
                              HAS_BACKUP: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, v[, backup].
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + (N_LISTS + 3) * n_tensors + pid)
    numel = tl.load(meta + N_LISTS * n_tensors + t)
    start = (pid - tl.load(meta + (N_LISTS + 2) * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    v_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    if HAS_BACKUP:
        b_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    else:
        b_ptr = w_ptr  # not used
    scale = tl.load(scale_ptr).to(tl.float32)
    w_ptr += start
    v_ptr += start
    b_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _shift_block(w_ptr, v_ptr, b_ptr, offs, tl.full([BLOCK], 1, tl.int1), scale, HAS_BACKUP)
    else:
        _shift_block(w_ptr, v_ptr, b_ptr, offs, offs < numel - start, scale, HAS_BACKUP)


# ------------------------------------------------------------------------------------------------
# launchers (one bucket each; see the op's backend contracts)

def _device_scalar(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.float32).reshape(())


def _reduce_launch(lists, mutated, launch_part) -> torch.Tensor:
    """``launch_part(part, partials, DTYPE, BLOCK)`` (one partial per block) over every part of the
    table of ``lists``, then the fixed-tree sum of the partials: a new 0-dim fp32 tensor."""
    device = lists[0][0].device
    lists, write_back = dense_lists(lists, mutated=mutated)
    out = torch.empty((), dtype=torch.float32, device=device)
    if not lists[0]:
        copy_back(write_back)
        return out.zero_()
    block = block_size(device)
    tab = table(lists, block)
    partials = torch.empty(tab.n_blocks, dtype=torch.float32, device=device)
    for part in tab.parts:
        launch_part(part, partials[part.first_block:], tl_dtype(lists[0][0].dtype), block)
    copy_back(write_back)
    sum_tree_(partials, out)
    return out


def momentum_sam_sgd_(params, grads, bufs, s_old: torch.Tensor, lr: float, momentum: float, weight_decay: float,
                      nesterov: bool) -> torch.Tensor:
    """Launch ``momentum_sam_sgd_kernel`` over one bucket; returns ``sum(v_new^2)`` (0-dim fp32)."""
    s = _device_scalar(s_old, params[0].device)

    def launch_part(part, partials, dtype, block):
        launch(momentum_sam_sgd_kernel, (part.n_blocks,), part.meta, part.n_tensors, partials, s, float(lr),
               float(momentum), float(weight_decay), DTYPE=dtype, NESTEROV=bool(nesterov),
               HAS_WEIGHT_DECAY=weight_decay != 0, ALIGN=part.align, BLOCK=block, num_warps=NUM_WARPS)

    return _reduce_launch([list(params), list(grads), list(bufs)], (0, 2), launch_part)


def adamw_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> tuple[float, float, float]:
    """(lr / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr * weight_decay), in double as the torch backend forms them."""
    return lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step), 1 - lr * weight_decay


def momentum_sam_adamw_(params, grads, exp_avgs, exp_avg_sqs, s_old: torch.Tensor, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float, step: int) -> torch.Tensor:
    """Launch ``momentum_sam_adamw_kernel`` over one bucket; returns ``sum(m_new^2)`` (0-dim fp32)."""
    s = _device_scalar(s_old, params[0].device)
    step_size, bc2_sqrt, decay = adamw_scalars(float(lr), float(beta1), float(beta2), float(weight_decay), int(step))

    def launch_part(part, partials, dtype, block):
        launch(momentum_sam_adamw_kernel, (part.n_blocks,), part.meta, part.n_tensors, partials, s, step_size,
               1.0 - float(beta1), float(beta2), 1.0 - float(beta2), bc2_sqrt, float(eps), decay, DTYPE=dtype,
               HAS_WEIGHT_DECAY=weight_decay != 0, ALIGN=part.align, BLOCK=block, num_warps=NUM_WARPS)

    return _reduce_launch([list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)], (0, 2, 3), launch_part)


def momentum_sam_shift_(params, bufs, scale: torch.Tensor, backups) -> None:
    """Launch ``momentum_sam_shift_kernel`` over one bucket (``backups`` a list or None)."""
    if not params:
        return
    lists = [list(params), list(bufs)] + ([list(backups)] if backups is not None else [])
    lists, write_back = dense_lists(lists, mutated=(0, 2) if backups is not None else (0,))
    if lists[0]:
        device = lists[0][0].device
        block = block_size(device)
        launch_table(momentum_sam_shift_kernel, table(lists, block), _device_scalar(scale, device),
                     DTYPE=tl_dtype(lists[0][0].dtype), N_LISTS=len(lists), HAS_BACKUP=backups is not None,
                     BLOCK=block)
    copy_back(write_back)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the ops are opaque).

@torch.library.custom_op("fastsam::momentum_sam_sgd_triton_", mutates_args=("params", "bufs"))
def momentum_sam_sgd_op(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                        s_old: torch.Tensor, lr: float, momentum: float, weight_decay: float,
                        nesterov: bool) -> torch.Tensor:
    return momentum_sam_sgd_(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov)


@momentum_sam_sgd_op.register_fake
def _(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov):
    return params[0].new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastsam::momentum_sam_adamw_triton_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def momentum_sam_adamw_op(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                          exp_avg_sqs: list[torch.Tensor], s_old: torch.Tensor, lr: float, beta1: float, beta2: float,
                          eps: float, weight_decay: float, step: int) -> torch.Tensor:
    return momentum_sam_adamw_(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay, step)


@momentum_sam_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay, step):
    return params[0].new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastsam::momentum_sam_shift_triton_", mutates_args=("params", "backups"))
def momentum_sam_shift_op(params: list[torch.Tensor], bufs: list[torch.Tensor], scale: torch.Tensor,
                          backups: list[torch.Tensor]) -> None:
    momentum_sam_shift_(params, bufs, scale, backups if backups else None)


@momentum_sam_shift_op.register_fake
def _(params, bufs, scale, backups):
    return None


def momentum_sam_sgd_entry(params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov) -> torch.Tensor:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    args = (list(params), list(grads), list(bufs), s_old, float(lr), float(momentum), float(weight_decay),
            bool(nesterov))
    if torch.compiler.is_compiling():
        return momentum_sam_sgd_op(*args)
    return momentum_sam_sgd_(*args)


def momentum_sam_adamw_entry(params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay,
                             step) -> torch.Tensor:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), s_old, float(lr), float(beta1),
            float(beta2), float(eps), float(weight_decay), int(step))
    if torch.compiler.is_compiling():
        return momentum_sam_adamw_op(*args)
    return momentum_sam_adamw_(*args)


def momentum_sam_shift_entry(params, bufs, scale, backups) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        momentum_sam_shift_op(list(params), list(bufs), scale, [] if backups is None else list(backups))
    else:
        momentum_sam_shift_(params, bufs, scale, backups)
