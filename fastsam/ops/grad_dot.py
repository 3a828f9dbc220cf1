"""Dot product and both squared norms of two gradient lists, in one reduction.

With ``a`` and ``b`` two lists of tensors of matching shapes (e.g. the gradient at ``w`` and the one
at ``w + e``), summing over every element of every tensor:

    stats = ( <a, b>,  ||a||^2,  ||b||^2 )        (fp32[3], on the device)

GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022) projects the
first-pass gradient onto the perturbed one with ``<g, g_p> / ||g_p||^2``; LookSAM (Liu et al.,
"Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022) projects the other way,
``<g, g_s> / ||g||^2``. Both need these three sums over the whole parameter set before they can
touch a single element, so they come out of one pass over ``a`` and ``b`` (8 bytes per fp32 element
read, nothing written) instead of three.

Accumulation is fp32 whatever the storage dtype (fp64, and an fp64 result, for fp64 tensors),
deterministic, and the result stays on the device.
Non-finite inputs give non-finite sums (callers use that as their skip flag).

Backend contract (``register("grad_dot", backend)``): ``fn(a, b) -> fp32[3]`` on one bucket (every
tensor of ``a`` and ``b`` on one device with one dtype), the bucket's partial sums in the order
above. Partial sums add across buckets, devices and (for sharded training) processes.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, mixed_precision_total
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, is_low_precision, pack_fp32, scalar_dtype

# Positions in the stats vector.
DOT, SQ_NORM_A, SQ_NORM_B = 0, 1, 2


def check_pairs(a: list[torch.Tensor], b: list[torch.Tensor], names: tuple[str, str] = ("a", "b")) -> None:
    """Same length, and each pair of tensors the same shape, dtype and device."""
    if len(a) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} differ in length ({len(a)} vs {len(b)})")
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            raise ValueError(f"{names[0]} and {names[1]} must match in shape, dtype and device; got "
                             f"{tuple(x.shape)}/{x.dtype}/{x.device} and {tuple(y.shape)}/{y.dtype}/{y.device}")
        if x.is_sparse or y.is_sparse:
            raise ValueError("sparse tensors are not supported")


def grad_dot(a: list[torch.Tensor], b: list[torch.Tensor], *, backend: str | None = "auto") -> torch.Tensor:
    """``(<a, b>, ||a||^2, ||b||^2)`` over all tensors, as fp32[3] on the device of ``a[0]``.

    Index the result with :data:`DOT`, :data:`SQ_NORM_A`, :data:`SQ_NORM_B`. No host sync.
    """
    a, b = list(a), list(b)
    if not a:
        raise ValueError("grad_dot needs at least one pair of tensors")
    check_pairs(a, b)
    out_device = a[0].device
    total = None
    for (device, dtype), idx in group_by_device_dtype(a).items():
        _, fn = resolve("grad_dot", backend, device, dtype)
        part = fn([a[i] for i in idx], [b[i] for i in idx]).to(out_device, non_blocking=True)
        total = part if total is None else total + part
    return mixed_precision_total(total, a)


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

def reduces_per_tensor(device: torch.device) -> bool:
    """Whether the torch backend reduces tensor by tensor with BLAS dots on this device.

    [note: how the torch backend reduces, per device]
    On CUDA, ``torch._foreach_norm`` covers a whole list in a few launches and accumulates in fp32
    as a tree of block partial sums (accurate to a few ulps): the multi-tensor path below. On the
    CPU there are no launches to save (CPU foreach ops loop over the tensors internally), and
    torch's CPU norm kernel keeps one long fp32 accumulator per thread chunk whose error grows with
    the tensor: about 2e-5 relative at 278011 bf16 values, 1e-4 at 3M fp32 values. ``torch.dot``
    (BLAS) is both accurate there (3e-7 at 3M) and about 4x faster than the multi-tensor path
    accumulating in fp64, so CPU buckets take one ``dot`` per tensor and per sum.
    """
    return device.type == "cpu"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _sq_norm_multi_tensor(tensors) -> torch.Tensor:
    # _foreach_norm refuses to narrow fp64 to fp32: fp64 lists accumulate in fp64.
    acc = torch.float64 if tensors[0].dtype == torch.float64 else FP32
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=acc)).square().sum()


def sum_sq_norms(tensors) -> torch.Tensor:
    """Sum of squares over a non-empty list, accumulated in fp32 (fp64 for fp64), as a 0-dim fp32 (fp64) tensor."""
    out = scalar_dtype(tensors[0].dtype)
    if reduces_per_tensor(tensors[0].device):
        if is_low_precision(tensors[0].dtype):
            tensors = [pack_fp32(tensors)]  # a half-precision dot would accumulate and round in half
        return torch.stack([torch.dot(_flat(t), _flat(t)) for t in tensors]).sum().to(out)
    return _sq_norm_multi_tensor(tensors).to(out)


@register("grad_dot", "torch")
def grad_dot_torch(a, b) -> torch.Tensor:
    """[note: the dot product from norms]
    torch has a multi-tensor norm but no multi-tensor sum, and a per-tensor ``torch.dot`` loop costs
    one launch per tensor on a GPU. So on the multi-tensor path the dot product comes from the
    polarisation identity ``<a, b> = (||a + b||^2 - ||a||^2 - ||b||^2) / 2``: one multi-tensor add
    and three multi-tensor norms, the last two of which are wanted anyway. Its rounding error is a
    few fp32 ulps of ``||a||^2 + ||b||^2``, the same order as a direct fp32 sum of ``a_i b_i`` for
    gradients of comparable size (the case here). The CPU path and the Triton/CUDA kernels sum the
    products directly.
    """
    check_bucket("grad_dot", a, b=b)
    if not a:
        return torch.zeros(3, dtype=FP32)
    out = scalar_dtype(a[0].dtype)
    if is_low_precision(a[0].dtype):
        a, b = [pack_fp32(a)], [pack_fp32(b)]  # fp32 math: pack once (see _torch_common)
    if reduces_per_tensor(a[0].device):
        rows = []
        for x, y in zip(a, b):
            x, y = _flat(x), _flat(y)
            rows.append(torch.stack([torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)]))
        return torch.stack(rows).sum(0).to(out)
    sq_a, sq_b = _sq_norm_multi_tensor(a), _sq_norm_multi_tensor(b)
    sq_sum = _sq_norm_multi_tensor(torch._foreach_add(a, b))
    return torch.stack([(sq_sum - sq_a - sq_b) * 0.5, sq_a, sq_b]).to(out)
