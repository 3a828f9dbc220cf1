"""Triton kernels of :mod:`fastsam.ops.restore_adamw_step`: ``w = backup`` and a ``torch.optim.AdamW`` step.

Two launches per bucket whatever the number of tensors (pointer table, see ``_multi_tensor``):

* ``restore_adamw_step_kernel``: one pass that reads the backup, the gradient and the moments and
  writes the weights and the moments (28 bytes per fp32 element, 36 with amsgrad), fp32 math in the
  order of torch's fused AdamW:

      w = backup;  g = g / grad_scale;  g = -g (maximize);  w -= lr * weight_decay * w
      m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;  vmax = max(vmax, v) (amsgrad)
      w -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

  with ``step`` = the tensor's device step counter + 1. The bias corrections are computed in fp64
  per program, as torch does in double: ``1 - beta2^step`` loses most of its digits in fp32 at
  small steps. ``ln(beta)`` travels as an fp32 pair (high + low part), since float kernel
  arguments are fp32.
* ``increment_steps_kernel``: adds 1 to every step counter afterwards. It cannot be folded into
  the first kernel: every block of a tensor reads the counter, and no block may see another's
  increment.

``lr`` (a float or a device tensor), ``grad_scale`` and ``found_inf`` are read on the device; a set
``found_inf`` keeps ``w = backup`` and leaves the moments and the step counters as they were.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch, launch_table, table, tl_dtype

STEP_BLOCK = 1024
_STEP_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
# Eight warps (8 elements per thread in a 2048-element block): the step keeps five to six values per
# element live in fp32 plus the fp64 bias corrections; with four warps that took 140-255 registers
# on sm_90 (spilling for fp16/bf16 with every flag on), with eight 62-102 on sm_90 and sm_80, triton
# 3.7 and 3.9 (tests/gpuless, bench/results/gpuless_resources.csv).
NUM_WARPS = 8


@triton.jit
def _adamw_block(w_ptr, g_ptr, b_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, lr, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, eps, weight_decay, step_size, bias_correction2_sqrt, grad_scale, step_ok,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 HAS_WEIGHT_DECAY: tl.constexpr):
    backup = tl.load(b_ptr + offs, mask=mask)
    w = backup.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        w = w - lr * weight_decay * w
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    ok = mask & step_ok
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + offs, vmax.to(backup.dtype), mask=ok)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w - tl.div_rn(step_size * m, denom)
    tl.store(m_ptr + offs, m.to(backup.dtype), mask=ok)
    tl.store(v_ptr + offs, v.to(backup.dtype), mask=ok)
    tl.store(w_ptr + offs, tl.where(step_ok, w.to(backup.dtype), backup), mask=mask)


@triton.jit
def restore_adamw_step_kernel(meta, n_tensors, lr_value, lr_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                              ln_beta1_hi, ln_beta1_lo, ln_beta2_hi, ln_beta2_lo, eps, weight_decay, grad_scale_ptr,
                              found_inf_ptr, DTYPE: tl.constexpr, STEP_DTYPE: tl.constexpr, N_LISTS: tl.constexpr,
                              LR_ON_DEVICE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                              HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                              HAS_WEIGHT_DECAY: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble);
    # lists: w, g, backup, m, v[, vmax], step (addresses of the one-element step counters).
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + (N_LISTS + 3) * n_tensors + pid)
    numel = tl.load(meta + N_LISTS * n_tensors + t)
    start = (pid - tl.load(meta + (N_LISTS + 2) * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(meta + 3 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    v_ptr = tl.multiple_of(tl.load(meta + 4 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    if AMSGRAD:
        vmax_ptr = tl.multiple_of(tl.load(meta + 5 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    else:
        vmax_ptr = v_ptr  # not used
    step_ptr = tl.load(meta + (N_LISTS - 1) * n_tensors + t).to(tl.pointer_type(STEP_DTYPE))
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
    # Bias corrections in fp64 (see the module docstring).
    step = tl.load(step_ptr).to(tl.float64) + 1.0
    ln_beta1 = tl.cast(ln_beta1_hi, tl.float64) + tl.cast(ln_beta1_lo, tl.float64)
    ln_beta2 = tl.cast(ln_beta2_hi, tl.float64) + tl.cast(ln_beta2_lo, tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * ln_beta1)
    bias_correction2 = 1.0 - tl.exp(step * ln_beta2)
    step_size = (tl.cast(lr, tl.float64) / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    # int32 offsets in the block, its int64 base in the pointers (see perturb.py's note on this)
    w_ptr += start
    g_ptr += start
    b_ptr += start
    m_ptr += start
    v_ptr += start
    vmax_ptr += start
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _adamw_block(w_ptr, g_ptr, b_ptr, m_ptr, v_ptr, vmax_ptr, offs, tl.full([BLOCK], 1, tl.int1), lr, beta1,
                     one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
                     grad_scale, step_ok, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, HAS_WEIGHT_DECAY)
    else:
        _adamw_block(w_ptr, g_ptr, b_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < numel - start, lr, beta1, one_minus_beta1,
                     beta2, one_minus_beta2, eps, weight_decay, step_size, bias_correction2_sqrt, grad_scale,
                     step_ok, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, HAS_WEIGHT_DECAY)


@triton.jit
def increment_steps_kernel(step_addresses, n_steps, found_inf_ptr, STEP_DTYPE: tl.constexpr,
                           HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_steps
    if HAS_FOUND_INF:
        mask = mask & (tl.where(tl.load(found_inf_ptr) == 0, tl.full([BLOCK], 1, tl.int32), 0) != 0)
    ptrs = tl.load(step_addresses + idx, mask=mask, other=0).to(tl.pointer_type(STEP_DTYPE))
    tl.store(ptrs, tl.load(ptrs, mask=mask) + 1.0, mask=mask)


def _fp32_pair(x: float) -> tuple[float, float]:
    """``x`` as ``hi + lo`` with both parts representable in fp32 (about 48 significant bits)."""
    if not math.isfinite(x):
        return x, 0.0
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _ln(beta: float) -> float:
    return -math.inf if beta == 0 else math.log(beta)


def restore_adamw_step_(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor,
                        beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf) -> None:
    """Launch the two kernels over one bucket; ``lr_tensor`` (if given) replaces ``lr``."""
    if not params:
        return
    device = params[0].device
    steps = list(state_steps)
    step_dtype = steps[0].dtype
    for s in steps:
        if s.numel() != 1 or s.device != device:
            raise ValueError("state_steps must be one-element tensors on the parameters' device")
        if s.dtype != step_dtype or s.dtype not in _STEP_DTYPES:
            raise ValueError(f"the Triton AdamW kernel needs fp32 or fp64 step counters of one dtype, got {s.dtype}")
    lists = [list(params), list(grads), list(backups), list(exp_avgs), list(exp_avg_sqs)]
    lists += [list(max_exp_avg_sqs)] if amsgrad else []
    lists, write_back = dense_lists(lists + [steps], mutated=(0, 3, 4, 5) if amsgrad else (0, 3, 4),
                                    address_only=(len(lists),))
    dummy = None
    if lists[0]:
        block = block_size(device)
        tab = table(lists, block, address_only=(len(lists) - 1,))  # the step counters: addresses only
        dummy = tab.meta  # stands in for absent device scalars; never read

        def scalar(x):
            return dummy if x is None else x.to(device=device).reshape(())

        b1_hi, b1_lo = _fp32_pair(_ln(beta1))
        b2_hi, b2_lo = _fp32_pair(_ln(beta2))
        launch_table(restore_adamw_step_kernel, tab, float(lr), scalar(lr_tensor),
                     float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), b1_hi, b1_lo, b2_hi, b2_lo,
                     float(eps), float(weight_decay), scalar(grad_scale), scalar(found_inf), DTYPE=tl_dtype(params[0].dtype),
                     STEP_DTYPE=_STEP_DTYPES[step_dtype], N_LISTS=len(lists), LR_ON_DEVICE=lr_tensor is not None,
                     AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), HAS_GRAD_SCALE=grad_scale is not None,
                     HAS_FOUND_INF=found_inf is not None, HAS_WEIGHT_DECAY=weight_decay != 0, BLOCK=block,
                     num_warps=NUM_WARPS)
    copy_back(write_back)
    # Every counter moves, empty parameters' included (as in torch).
    step_table = table([steps], 1, address_only=(0,))  # one part: row 0 is every counter's address
    launch(increment_steps_kernel, (triton.cdiv(len(steps), STEP_BLOCK),), step_table.meta, len(steps),
           step_table.meta if found_inf is None else found_inf.to(device=device).reshape(()),
           STEP_DTYPE=_STEP_DTYPES[step_dtype], HAS_FOUND_INF=found_inf is not None, BLOCK=STEP_BLOCK)


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::restore_adamw_step_triton_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
def restore_adamw_step_op(params: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
                          exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                          max_exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor], lr: float,
                          lr_tensor: torch.Tensor | None, beta1: float, beta2: float, eps: float, weight_decay: float,
                          amsgrad: bool, maximize: bool, grad_scale: torch.Tensor | None,
                          found_inf: torch.Tensor | None) -> None:
    restore_adamw_step_(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor,
                        beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf)


@restore_adamw_step_op.register_fake
def _(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, grad_scale, found_inf):
    return None


def restore_adamw_step_entry(params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                             beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf) -> None:
    """What the op's ``triton`` backend calls (``lr`` a float or a 0-dim tensor)."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    args = (list(params), list(grads), list(backups), list(exp_avgs), list(exp_avg_sqs),
            list(max_exp_avg_sqs) if amsgrad else [], list(state_steps), 0.0 if lr_tensor is not None else float(lr),
            lr_tensor, float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize),
            grad_scale, found_inf)
    if torch.compiler.is_compiling():
        restore_adamw_step_op(*args)
    else:
        restore_adamw_step_(*args)
