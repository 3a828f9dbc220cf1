"""Triton kernels of :mod:`fastsam.ops.grad_norm`: the global squared norm of a list of gradients.

Per element, summed over every tensor of the bucket (see the op's docstring for the papers):

* plain:    ``g^2``
* adaptive: ``((|w| + eta) g)^2``
* fisher:   ``g^2 / (1 + eta g^2)``

Two launches per bucket whatever the number of tensors: ``grad_sq_norm_partials_kernel`` writes
one fp32 partial sum per block (one program per block of one tensor, via the pointer table of
``_multi_tensor``), and ``sum_partials_kernel`` adds the partials in a fixed order in a single
program. No atomics, so the result is bitwise reproducible; it stays on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import alignment, block_size, dense_lists, launch, table, tl_dtype

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
    """``out = sum(partials[:n])`` in one program: a fixed order, so a reproducible result."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, axis=0))


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
    launch(grad_sq_norm_partials_kernel, (tab.n_blocks,), tab.meta, tab.n_tensors, partials, float(eta),
           DTYPE=tl_dtype(grads[0].dtype), MODE=mode_id, N_LISTS=len(lists), ALIGN=alignment(tab), BLOCK=block)
    launch(sum_partials_kernel, (1,), partials, tab.n_blocks, out, BLOCK=REDUCE_BLOCK)
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
