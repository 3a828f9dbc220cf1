"""Triton kernel of :mod:`fastsam.ops.perturb`: ``backup = w; w += rho / (norm + eps) * d``, one launch.

``d`` is ``g`` (SAM), ``(|w| + eta)^2 g`` (ASAM) or ``g / (1 + eta g^2)`` (Fisher SAM). One program
per block of one tensor (pointer table, see ``_multi_tensor``) reads ``w`` and ``g`` once and
writes the backup and the new weights: 16 bytes per fp32 element, the floor for this op.

The norm is read on the device and the scale ``rho / (norm + eps)`` computed by every program, so
there is no host synchronisation. A non-finite norm masks the weight store off (the backup is
still written), which leaves the weights bit-for-bit untouched.

Stochastic weight perturbation (ESAM's SWP): with ``SWP``, element ``i`` of the bucket is kept iff
``tl.rand(seed, offset + i) < beta`` and the kept perturbation is scaled by ``1 / beta``; the mask
is drawn in registers and never stored (``fastsam/ops/_philox.py`` draws the same one in torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, copy_back, dense_lists, launch_table, table, tl_dtype
from .grad_norm import MODES


@triton.jit
def _perturb_block(w_ptr, g_ptr, b_ptr, offs, mask, counters, scale, finite, eta, beta, seed,
                   MODE: tl.constexpr, SWP: tl.constexpr):
    w_raw = tl.load(w_ptr + offs, mask=mask)
    tl.store(b_ptr + offs, w_raw, mask=mask)
    w = w_raw.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        d = g
    elif MODE == 1:
        t = tl.abs(w) + eta
        d = t * t * g
    else:
        d = tl.div_rn(g, 1.0 + eta * g * g)
    if SWP:
        d = tl.where(tl.rand(seed, counters) < beta, d, 0.0)
    tl.store(w_ptr + offs, (w + scale * d).to(w_raw.dtype), mask=mask & finite)


@triton.jit(do_not_specialize=["seed", "offset"])  # both change every step: no recompiles for them
def perturb_kernel(meta, n_tensors, norm_ptr, rho, eta, eps, beta, seed, offset, DTYPE: tl.constexpr,
                   MODE: tl.constexpr, SWP: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble); lists: w, g, backup.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 6 * n_tensors + pid)
    numel = tl.load(meta + 3 * n_tensors + t)
    start = (pid - tl.load(meta + 5 * n_tensors + t)) * BLOCK
    w_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(meta + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    norm = tl.load(norm_ptr).to(tl.float32)
    finite = tl.where(tl.abs(norm) < float("inf"), tl.full([BLOCK], 1, tl.int32), 0) != 0  # inf, NaN: False
    scale = tl.div_rn(rho, norm + eps)
    if SWP:
        scale = tl.div_rn(scale, beta)
    # [note: int32 offsets in the block] The block's base (int64) moves into the pointers and the
    # per-element offsets stay int32: with int64 offsets every element carried its own 64-bit
    # address, 162 registers for an unaligned fp32 block on sm_90 (triton 3.9) instead of 80.
    w_ptr += start
    g_ptr += start
    b_ptr += start
    offs = tl.arange(0, BLOCK)
    if SWP:
        # Element i of the bucket draws counter offset + i: the tensor's running start plus the block's.
        counters = (offset + tl.load(meta + 4 * n_tensors + t) + start) + offs
    else:
        counters = offs  # unused
    if start + BLOCK <= numel:
        _perturb_block(w_ptr, g_ptr, b_ptr, offs, tl.full([BLOCK], 1, tl.int1), counters, scale, finite, eta, beta,
                       seed, MODE, SWP)
    else:
        _perturb_block(w_ptr, g_ptr, b_ptr, offs, offs < numel - start, counters, scale, finite, eta, beta, seed,
                       MODE, SWP)


# SWP draws one Philox counter per element (ten rounds on four 32-bit words): with the usual 16
# elements per thread (4 warps) the draws took up to 234 registers on triton 3.7 and 222 on 3.9 for
# sm_90 (two blocks per SM: too few bytes in flight for a streaming kernel). Eight warps halve the
# elements per thread: 52-66 registers on triton 3.7, 51-80 on 3.9 (sm_90 and sm_80; tests/gpuless,
# bench/results/gpuless_resources.csv).
SWP_NUM_WARPS = 8


def swp_num_warps(swp: bool) -> int | None:
    """Warps per program: ``SWP_NUM_WARPS`` for a masked perturbation, else the default."""
    return SWP_NUM_WARPS if swp else None


def perturb_(params, grads, backups, norm: torch.Tensor, rho: float, mode: str, eta: float, eps: float,
             beta: float, seed: int, offset: int) -> None:
    """Launch ``perturb_kernel`` over one bucket (see the op's backend contract)."""
    if not params:
        return
    (ps, gs, bs), write_back = dense_lists([list(params), list(grads), list(backups)], mutated=(0, 2),
                                           logical_order=beta < 1.0)
    if ps:
        device = ps[0].device
        block = block_size(device)
        tab = table([ps, gs, bs], block)
        norm = norm.to(device=device, dtype=torch.float32).reshape(())
        launch_table(perturb_kernel, tab, norm, float(rho), float(eta), float(eps), float(beta), _as_int64(seed),
                     int(offset), DTYPE=tl_dtype(ps[0].dtype), MODE=MODES[mode], SWP=beta < 1.0, BLOCK=block,
                     num_warps=swp_num_warps(beta < 1.0))
    copy_back(write_back)


def _as_int64(seed: int) -> int:
    """The seed's 64 bits as a signed int64 (the op schema's int); the kernel reads them back as uint64."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


# ------------------------------------------------------------------------------------------------
# torch.library registration (see grad_norm.py for why the op is opaque).

@torch.library.custom_op("fastsam::perturb_triton_", mutates_args=("params", "backups"))
def perturb_op(params: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
               norm: torch.Tensor, rho: float, geometry: str, eta: float, eps: float, beta: float, seed: int,
               offset: int) -> None:
    perturb_(params, grads, backups, norm, rho, geometry, eta, eps, beta, seed, offset)


@perturb_op.register_fake
def _(params, grads, backups, norm, rho, geometry, eta, eps, beta, seed, offset):
    return None


def perturb_entry(params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset) -> None:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    if torch.compiler.is_compiling():
        perturb_op(list(params), list(grads), list(backups), norm, float(rho), mode, float(eta), float(eps),
                   float(beta), _as_int64(seed), int(offset))
    else:
        perturb_(params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset)
