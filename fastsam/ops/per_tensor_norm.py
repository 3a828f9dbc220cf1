"""Per-tensor (per-layer) L2 norms of a list of tensors, all of them in one pass.

For tensors ``x_0 .. x_{T-1}`` the op returns the fp32 vector ``[||x_0||, ..., ||x_{T-1}||]`` (or
the squared norms), on the device of ``x_0``. Layer-wise perturbations need it twice per step: AWP
(Wu et al., "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020) and
WT-AWP (Wu et al., AAAI 2023) perturb layer ``l`` by ``rho ||w_l|| g_l / ||g_l||``; both norms come from this op and the scale vector from a handful of ops on a
length-``T`` vector (see :func:`fastsam.ops.perturb_per_tensor_`).

Accumulation is fp32 whatever the storage dtype, in a fixed order, so the result is deterministic;
it stays on the device. fp64 tensors (torch backend) are reduced, and returned, in fp64; a list
that mixes fp64 with other dtypes gets fp32. An empty tensor has norm 0.

Backend contract (``register("per_tensor_norm", backend)``): ``fn(tensors) -> fp32[len(tensors)]``
(fp64 for an fp64 bucket), the *squared* norms of one bucket (one device, one dtype, no empty tensor: the wrapper below drops
those), in a constant number of launches whatever the number of tensors.
"""

from __future__ import annotations

import torch

from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32


def per_tensor_sq_norms(tensors: list[torch.Tensor], *, backend: str | None = "auto") -> torch.Tensor:
    """``[sum(x_t^2) for x_t in tensors]`` as one fp32 vector on the device of ``tensors[0]``."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("per_tensor_norm needs at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"tensors[{i}] must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.is_sparse:
            raise TypeError(f"tensors[{i}] is sparse; per_tensor_norm takes dense tensors")
    out_device = tensors[0].device
    groups = group_by_device_dtype(tensors)
    if len(groups) == 1 and all(t.numel() for t in tensors):  # the usual case: one bucket, nothing empty
        (device, dtype), _ = next(iter(groups.items()))
        _, fn = resolve("per_tensor_norm", backend, device, dtype)
        return fn(tensors)
    all_fp64 = all(t.dtype == torch.float64 for t in tensors)
    out = torch.zeros(len(tensors), dtype=torch.float64 if all_fp64 else FP32, device=out_device)
    for (device, dtype), idx in groups.items():
        idx = [i for i in idx if tensors[i].numel()]
        if not idx:
            continue
        _, fn = resolve("per_tensor_norm", backend, device, dtype)
        part = fn([tensors[i] for i in idx]).to(device=out_device, dtype=out.dtype, non_blocking=True)
        out.index_copy_(0, torch.tensor(idx, device=out_device), part)
    return out


def per_tensor_norm(tensors: list[torch.Tensor], *, backend: str | None = "auto") -> torch.Tensor:
    """``[||x_t|| for x_t in tensors]``: fp32 on the device of ``tensors[0]``, no host sync."""
    return per_tensor_sq_norms(tensors, backend=backend).sqrt()


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

# See grad_norm.py's [note: CPU reduction accuracy]: long CPU tensors are reduced in slices, then
# the slices of one tensor added in fp64 (one index_add over all slices).
_CHUNK = 1 << 18
_segments: dict[tuple, torch.Tensor] = {}


@register("per_tensor_norm", "torch")
def per_tensor_sq_norms_torch(tensors) -> torch.Tensor:
    device = tensors[0].device
    fp64 = tensors[0].dtype == torch.float64
    dtype, out_dtype = (None, torch.float64) if fp64 else (FP32, FP32)
    if device.type != "cpu" or all(t.numel() <= _CHUNK for t in tensors):
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
        return torch.stack(norms).double().square().to(out_dtype)
    pieces, owner = [], []
    for i, t in enumerate(tensors):
        n = t.numel()
        if n <= _CHUNK:
            pieces.append(t)
            owner.append(i)
            continue
        flat = t.reshape(-1)  # a view when contiguous; a copy (still exact) otherwise
        for s in range(0, n, _CHUNK):
            pieces.append(flat[s:s + _CHUNK])
            owner.append(i)
    key = (len(tensors), tuple(owner))
    seg = _segments.get(key)
    if seg is None:
        seg = _segments[key] = torch.tensor(owner, dtype=torch.int64)
        if len(_segments) > 64:
            _segments.pop(next(iter(_segments)))
    parts = torch.stack(torch._foreach_norm(pieces, 2, dtype=dtype)).double().square()
    return torch.zeros(len(tensors), dtype=torch.float64).index_add_(0, seg, parts).to(out_dtype)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/per_tensor_norm.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("per_tensor_norm", "cuda")
def per_tensor_sq_norms_cuda(tensors) -> torch.Tensor:
    return _cuda.call("per_tensor_sq_norms", (list(tensors),), per_tensor_sq_norms_torch, (tensors,))


@_cuda.fake("per_tensor_sq_norms")
def _per_tensor_sq_norms_fake(tensors):
    return tensors[0].new_empty((len(tensors),), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("per_tensor_norm", "triton")
def per_tensor_sq_norms_triton(tensors) -> torch.Tensor:
    from fastsam.kernels import per_tensor_norm as kernels  # imported on first use: triton is optional

    return kernels.per_tensor_sq_norms_entry(tensors)
