"""Global gradient norm over a list of tensors: plain, adaptive or Fisher.

With ``g`` the gradient and ``w`` the weights, summing over every element of every tensor:

* ``plain``    (SAM, Foret et al., ICLR 2021):      ``||g||^2      = sum g^2``
* ``adaptive`` (ASAM, Kwon et al., ICML 2021):      ``||T g||^2    = sum ((|w| + eta) g)^2``
* ``fisher``   (Fisher SAM, Kim et al., ICML 2022): ``||g||_F^2    = sum g^2 / (1 + eta g^2)``

The norm is ``sqrt`` of that sum. Accumulation is fp32 whatever the storage dtype (fp64 for fp64
tensors), deterministic, and the result stays on the device (a 0-dim fp32 tensor, fp64 for fp64
tensors): reading it is the caller's choice.

Backend contract (``register("grad_norm", backend)``): ``fn(grads, params, mode, eta) -> Tensor``
takes one bucket (all tensors on one device, one dtype) and returns the bucket's *squared* norm as a
0-dim fp32 tensor on that device (fp64 for fp64 buckets, which only the torch backend takes); ``params`` may be ``None`` when ``mode == "plain"``. Squared
partial norms add across buckets, devices and (for sharded training) processes.
"""

from __future__ import annotations

import torch

from ._checks import check_bucket, mixed_precision_total
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, is_low_precision, pack_fp32, scalar_dtype

MODES = ("plain", "adaptive", "fisher")


def check_mode(mode: str, eta: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(eta, (int, float)) and eta >= 0 and eta == eta and eta != float("inf")):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def grad_sq_norm(grads: list[torch.Tensor], params: list[torch.Tensor] | None = None, *,
                 mode: str = "plain", eta: float = 0.0, backend: str | None = "auto") -> torch.Tensor:
    """Sum of squares (per ``mode``) over all of ``grads``; 0-dim fp32 on the first grad's device."""
    check_mode(mode, eta)
    grads = list(grads)
    if not grads:
        raise ValueError("grad_norm needs at least one tensor")
    if mode != "plain":
        if params is None:
            raise ValueError(f"mode={mode!r} needs params")
        params = list(params)
        if len(params) != len(grads):
            raise ValueError(f"params and grads differ in length ({len(params)} vs {len(grads)})")
    out_device = grads[0].device
    total = None
    for (device, dtype), idx in group_by_device_dtype(grads).items():
        _, fn = resolve("grad_norm", backend, device, dtype)
        part = fn([grads[i] for i in idx], None if params is None else [params[i] for i in idx], mode, eta)
        part = part.to(out_device, non_blocking=True)
        total = part if total is None else total + part
    return mixed_precision_total(total, grads)


def grad_norm(grads: list[torch.Tensor], params: list[torch.Tensor] | None = None, *,
              mode: str = "plain", eta: float = 0.0, backend: str | None = "auto") -> torch.Tensor:
    """Global L2 norm of ``grads`` (plain), of ``(|w|+eta)*g`` (adaptive) or the Fisher norm.

    Returns a 0-dim fp32 tensor on the device of ``grads[0]``; no host synchronisation.
    """
    return grad_sq_norm(grads, params, mode=mode, eta=eta, backend=backend).sqrt()


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

def scaled_grads_torch(grads, params, mode: str, eta: float):
    """Per-element terms whose squares sum to the norm: g, (|w|+eta) g, or g / sqrt(1 + eta g^2).

    fp32 lists (low-precision buckets arrive packed). Returns a list; for ``plain`` it is ``grads``.
    """
    if mode == "plain":
        return grads
    if mode == "adaptive":
        t = torch._foreach_abs(params)
        torch._foreach_add_(t, eta)
        torch._foreach_mul_(t, grads)
        return t
    t = torch._foreach_mul(grads, grads)  # fisher
    torch._foreach_mul_(t, eta)
    torch._foreach_add_(t, 1.0)
    torch._foreach_rsqrt_(t)
    torch._foreach_mul_(t, grads)
    return t


@register("grad_norm", "torch")
def grad_sq_norm_torch(grads, params, mode: str, eta: float) -> torch.Tensor:
    if mode != "plain":
        check_bucket("grad_norm", grads, params=params)
    if not grads:
        return torch.zeros((), dtype=FP32)
    out_dtype = scalar_dtype(grads[0].dtype)
    if mode == "plain":
        terms = grads
    else:
        if is_low_precision(grads[0].dtype):
            grads, params = [pack_fp32(grads)], [pack_fp32(params)]
        terms = scaled_grads_torch(grads, params, mode, eta)
    # fp32 accumulation whatever the storage dtype (fp64 keeps its own precision).
    dtype = None if terms[0].dtype == torch.float64 else FP32
    norms = torch._foreach_norm(_reduction_chunks(terms), 2, dtype=dtype)
    # The few partial norms are summed in fp64: deterministic, and exact enough to be invisible.
    return torch.stack(norms).double().square().sum().to(out_dtype)


# [note: CPU reduction accuracy]
# torch's CPU norm kernels accumulate a long tensor in a handful of fp32 running sums, which loses
# about 1e-4 (relative) at a few million elements. Reducing each tensor in slices of at most
# _CHUNK elements (views: no copies, and still one _foreach_norm call) brings that to a few 1e-6
# (2^16-element slices reach 3e-7 but cost a third more time on 2 CPU threads). GPU reductions are
# already blocked.
_CHUNK = 1 << 18


def _reduction_chunks(tensors):
    if tensors[0].device.type != "cpu":
        return tensors
    out = []
    for t in tensors:
        n = t.numel()
        if n <= _CHUNK or not t.is_contiguous():
            out.append(t)
            continue
        flat = t.view(-1)
        out.extend(flat[i:i + _CHUNK] for i in range(0, n, _CHUNK))
    return out


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/grad_norm.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("grad_norm", "cuda")
def grad_sq_norm_cuda(grads, params, mode: str, eta: float) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=FP32)
    return _cuda.call("grad_sq_norm", (grads, params if mode == "adaptive" else [], mode, float(eta)),
                      grad_sq_norm_torch, (grads, params, mode, eta))


@_cuda.fake("grad_sq_norm")
def _grad_sq_norm_fake(grads, params, norm_mode, eta):
    return grads[0].new_empty((), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("grad_norm", "triton")
def grad_sq_norm_triton(grads, params, mode: str, eta: float) -> torch.Tensor:
    if mode != "plain":
        check_bucket("grad_norm", grads, params=params)
    from fastsam.kernels import grad_norm as kernels  # imported on first use: triton is optional

    return kernels.grad_sq_norm_entry(grads, params, mode, eta)
