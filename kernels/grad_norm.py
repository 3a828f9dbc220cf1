"""Triton kernels of :mod:`fastsam.ops.grad_norm`: the global squared norm of a list of gradients.

Per element, summed over every tensor of the bucket (see the op's docstring for the papers):

* plain:    ``g^2``
* adaptive: ``((|w| + eta) g)^2``
* fisher:   ``g^2 / (1 + eta g^2)``

A constant number of launches per bucket whatever the number of tensors:
``grad_sq_norm_partials_kernel`` writes one fp32 partial sum per block (one program per block of one
tensor, via the pointer table of ``_multi_tensor``; one launch per alignment part), then
``sum_partials_kernel`` adds them as a fixed-shape tree: every program sums ``REDUCE_BLOCK``
consecutive partials, level after level, until one value is left. A 7B-parameter bucket has
about 3.4M partials (2048 elements a block): three levels of 3.4k, 4 and 1 programs, where a
single program would stream all 3.4M partials on one SM. No atomics and a fixed order, so the
result is bitwise reproducible; it stays on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import block_size, dense_lists, launch, table, tl_dtype

MODES = {"plain": 0, "adaptive": 1, "fisher": 2}
REDUCE_BLOCK = 1024


@triton.jit
def _sq_terms(g_ptr, w_ptr, offs, mask, eta, MODE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        terms = g * g
    elif MODE == 1:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tg = (tl.abs(w) + eta) * g
        terms = tg * tg
    else:
        gg = g * g
        terms = tl.div_rn(gg, 1.0 + eta * gg)
    return tl.sum(terms, axis=0)


@triton.jit
def grad_sq_norm_partials_kernel(meta, n_tensors, partials, eta, DTYPE: tl.constexpr, MODE: tl.constexpr,
                                 N_LISTS: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Locate this program's block (see _multi_tensor's note on the preamble).
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + (N_LISTS + 3) * n_tensors + pid)
    numel = tl.load(meta + N_LISTS * n_tensors + t)
    start = (pid - tl.load(meta + (N_LISTS + 2) * n_tensors + t)) * BLOCK
    g_ptr = tl.multiple_of(tl.load(meta + t).to(tl.pointer_type(DTYPE)), ALIGN)
    if MODE == 1:
        w_ptr = tl.multiple_of(tl.load(meta + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    else:
        w_ptr = g_ptr  # not read
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        part = _sq_terms(g_ptr, w_ptr, offs, tl.full([BLOCK], 1, tl.int1), eta, MODE)
    else:
        part = _sq_terms(g_ptr, w_ptr, offs, offs < numel, eta, MODE)
    tl.store(partials + pid, part)


@triton.jit
def sum_partials_kernel(partials, n, out, BLOCK: tl.constexpr):
    """``out[p] = sum(partials[p * BLOCK:(p + 1) * BLOCK])``: one level of the reduction tree."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + pid, tl.sum(tl.load(partials + offs, mask=offs < n, other=0.0), axis=0))


def sum_tree_(partials: torch.Tensor, out: torch.Tensor) -> None:
    """``out = sum(partials)`` (0-dim fp32) by levels of ``REDUCE_BLOCK``-wide sums: a fixed order."""
    n = partials.numel()
    while True:
        m = triton.cdiv(n, REDUCE_BLOCK)
        level = out if m == 1 else torch.empty(m, dtype=torch.float32, device=partials.device)
        launch(sum_partials_kernel, (m,), partials, n, level, BLOCK=REDUCE_BLOCK)
        if m == 1:
            return
        partials, n = level, m


def grad_sq_norm(grads: list[torch.Tensor], params: list[torch.Tensor], mode: str, eta: float) -> torch.Tensor:
    """Squared norm (per ``mode``) of one bucket, as a new 0-dim fp32 tensor on its device."""
    device = grads[0].device
    mode_id = MODES[mode]
    lists = [list(grads)] + ([list(params)] if mode_id == 1 else [])
    lists, _ = dense_lists(lists)
    out = torch.empty((), dtype=torch.float32, device=device)
    if not lists[0]:
        return out.zero_()
    block = block_size(device)
    tab = table(lists, block)
    partials = torch.empty(tab.n_blocks, dtype=torch.float32, device=device)
    for part in tab.parts:
        launch(grad_sq_norm_partials_kernel, (part.n_blocks,), part.meta, part.n_tensors,
               partials[part.first_block:], float(eta), DTYPE=tl_dtype(grads[0].dtype), MODE=mode_id,
               N_LISTS=len(lists), ALIGN=part.align, BLOCK=block)
    sum_tree_(partials, out)
    return out


# ------------------------------------------------------------------------------------------------
# torch.library registration: torch.compile sees one opaque op (the pointer tables are built from
# data_ptr() on the host, which tracing cannot follow), with a fake implementation for shapes.
# The norm geometry is called ``geometry`` in the schemas: an argument named ``mode`` collides with
# a parameter of torch's auto_functionalize machinery (torch 2.13), which breaks mutating ops.

@torch.library.custom_op("fastsam::grad_sq_norm_triton", mutates_args=())
def grad_sq_norm_op(grads: list[torch.Tensor], params: list[torch.Tensor], geometry: str, eta: float) -> torch.Tensor:
    return grad_sq_norm(grads, params, geometry, eta)


@grad_sq_norm_op.register_fake
def _(grads, params, geometry, eta):
    return grads[0].new_empty((), dtype=torch.float32)


def grad_sq_norm_entry(grads, params, mode: str, eta: float) -> torch.Tensor:
    """What the op's ``triton`` backend calls: the custom op when compiling, the launcher otherwise."""
    params = [] if params is None or mode != "adaptive" else list(params)
    if torch.compiler.is_compiling():
        return grad_sq_norm_op(list(grads), params, mode, float(eta))
    return grad_sq_norm(grads, params, mode, eta)
