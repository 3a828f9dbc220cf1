"""A weighted mix of two tensor lists, in place: ``x <- a x + b y`` (optionally swapping x and y).

WSAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
Regularization Term", KDD 2023) updates with ``g + alpha (g_p - g) = alpha g_p + (1 - alpha) g``,
or, decoupled, steps the base optimizer with ``g`` and then adds ``- lr alpha (g_p - g)`` to the
weights; WT-AWP mixes ``lmbda g(w) + (1 - lmbda) g(w + e)``. All of these are this one op:

* ``swap=False``: ``x <- a x + b y``                       (reads x, y; writes x: 12 fp32 bytes)
* ``swap=True``:  ``y <- a x + b y`` and ``x <- y_old``    (reads x, y; writes both: 16 bytes)

The swap form is WSAM's decoupled step in one pass: with ``x = g_p`` (``.grad``) and ``y = g`` (the
saved first-pass gradient), ``.grad`` becomes ``g`` for the base step and the buffer becomes the
sharpness term ``g_p - g``, with no extra buffer. The same op then applies that term after the base
step, with ``x = w``, ``y = g_p - g``, ``a = 1``, ``b = -lr alpha``.

``a`` and ``b`` are Python floats or 0-dim tensors (a clip coefficient or a tensor learning rate
stays on the device: no host sync). ``skip`` is an optional 0-dim device flag: non-zero leaves
both lists untouched (a base step that ``GradScaler`` skipped must skip its decoupled term too).
Math in fp32 (fp64 for fp64 tensors in the torch backend).

Backend contract (``register("grad_mix", backend)``): ``fn(xs, ys, a, b, swap, skip) -> None`` on
one bucket; ``a``, ``b`` are 0-dim fp32 tensors on the bucket's device, ``skip`` one too or None.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bucket, check_like_params
from ._dispatch import group_by_device_dtype, register, resolve
from ._torch_common import FP32, add_scaled_or_skip_, as_device_scalar, flat_views, is_low_precision


def _check_coef(name, value) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating tensor, got shape "
                             f"{tuple(value.shape)} {value.dtype}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or a one-element tensor, got {value!r}")


def check_skip(skip) -> None:
    if skip is not None and (not isinstance(skip, torch.Tensor) or skip.numel() != 1):
        raise ValueError(f"skip must be None or a one-element tensor, got {skip!r}")


def grad_mix_(xs: list[torch.Tensor], ys: list[torch.Tensor], a, b, *, swap: bool = False,
              skip: torch.Tensor | None = None, backend: str | None = "auto") -> None:
    """``xs <- a xs + b ys`` (``swap=False``) or ``ys <- a xs + b ys; xs <- old ys`` (``swap=True``)."""
    _check_coef("a", a)
    _check_coef("b", b)
    check_skip(skip)
    xs, ys = list(xs), list(ys)
    check_like_params(xs, ys=ys)
    for (device, dtype), idx in group_by_device_dtype(xs).items():
        _, fn = resolve("grad_mix", backend, device, dtype)
        fn([xs[i] for i in idx], [ys[i] for i in idx], as_device_scalar(a, device), as_device_scalar(b, device),
           bool(swap), None if skip is None else as_device_scalar(skip, device))


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat copy of ``tensors`` in the math dtype (fp64 stays fp64, the rest is fp32): 2 kernels."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat if flat.dtype == torch.float64 else flat.to(FP32)


def unpack_into_(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat math-dtype tensor back into ``tensors`` with one rounding."""
    torch._foreach_copy_(tensors, flat_views(flat.to(tensors[0].dtype), tensors))


@register("grad_mix", "torch")
def grad_mix_torch(xs, ys, a, b, swap, skip) -> None:
    check_bucket("grad_mix", xs, ys=ys)
    if not xs:
        return
    if is_low_precision(xs[0].dtype) or (skip is not None and swap):
        _grad_mix_flat(xs, ys, a, b, swap, skip)
        return
    # [note: grad_mix in the torch backend] fp32/fp64 lists are updated with _foreach_* calls, a
    # constant number of kernels whatever the number of tensors. The skip flag goes through torch's
    # fused SGD kernel (see _torch_common's note on skipping without a host sync) as x += d with
    # d = (a - 1) x + b y; the rarely needed swap-with-skip form takes the flat path.
    dtype = xs[0].dtype
    a, b = a.to(dtype), b.to(dtype)
    by = torch._foreach_mul(ys, b)
    if skip is None:
        if swap:
            mixed = torch._foreach_mul(xs, a)
            torch._foreach_add_(mixed, by)
            torch._foreach_copy_(xs, ys)
            torch._foreach_copy_(ys, mixed)
        else:
            torch._foreach_mul_(xs, a)
            torch._foreach_add_(xs, by)
        return
    ax = torch._foreach_mul(xs, a - 1)
    torch._foreach_add_(ax, by)
    add_scaled_or_skip_(xs, ax, torch.ones((), dtype=FP32, device=xs[0].device), skip.to(FP32))


def _grad_mix_flat(xs, ys, a, b, swap, skip) -> None:
    # Flat fp32 copies (see _torch_common's note on fp32 math): the skip is then one torch.where.
    x, y = pack(xs), pack(ys)
    mixed = torch.add(x * a.to(x.dtype), y * b.to(x.dtype))
    if skip is not None:
        keep = skip == 0
        mixed = torch.where(keep, mixed, y if swap else x)
        if swap:
            y = torch.where(keep, y, x)
    if swap:
        unpack_into_(ys, mixed)
        unpack_into_(xs, y)
    else:
        unpack_into_(xs, mixed)


# --------------------------------------------------------------------------------------------
# cuda backend (csrc/grad_mix.cu via fastsam._C; see _cuda_common.py)
# --------------------------------------------------------------------------------------------

from . import _cuda_common as _cuda  # noqa: E402


@register("grad_mix", "cuda")
def grad_mix_cuda(xs, ys, a, b, swap, skip) -> None:
    if not xs:
        return
    _cuda.call("grad_mix_", (xs, ys, a, b, bool(swap), skip), grad_mix_torch, (xs, ys, a, b, swap, skip))


@_cuda.fake("grad_mix_")
def _grad_mix_fake(xs, ys, a, b, swap, skip):
    return None


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

@register("grad_mix", "triton")
def grad_mix_triton(xs, ys, a, b, swap, skip) -> None:
    check_bucket("grad_mix", xs, ys=ys)
    from fastsam.kernels import grad_mix as kernels  # imported on first use: triton is optional

    kernels.grad_mix_entry(xs, ys, a, b, swap, skip)
