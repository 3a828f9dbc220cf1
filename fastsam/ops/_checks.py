"""Argument checks shared by the op wrappers: everything is validated before any tensor is touched."""

from __future__ import annotations

import torch


def check_like_params(params: list[torch.Tensor], **lists: list[torch.Tensor]) -> None:
    """Every list has one tensor per parameter, with the parameter's shape, dtype and device."""
    n = len(params)
    for name, ts in lists.items():
        if len(ts) != n:
            raise ValueError(f"{name} must have one tensor per parameter (length {len(ts)}, not {n})")
        for i, (p, t) in enumerate(zip(params, ts)):
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"{name}[{i}] does not match its parameter in shape, dtype or device: "
                                 f"{tuple(t.shape)}/{t.dtype}/{t.device} vs "
                                 f"{tuple(p.shape)}/{p.dtype}/{p.device}")


def check_bucket(op: str, reference: list[torch.Tensor], **lists: list[torch.Tensor]) -> None:
    """What every backend checks on entry, before launching anything: one tensor per reference
    tensor in each list, each of the reference tensor's shape.

    The kernels walk each tensor's memory for ``numel`` elements of the reference, so a shorter list or
    a smaller tensor would read or write out of bounds. The usual case costs one C-level comparison
    per list; only a mismatch is looked at tensor by tensor, for the error message.
    """
    n = len(reference)
    sizes = None
    for name, ts in lists.items():
        if len(ts) != n:
            raise ValueError(f"{op}: {name} has {len(ts)} tensors, expected {n} (one per parameter)")
        if sizes is None:
            sizes = list(map(torch.Tensor.size, reference))
        if list(map(torch.Tensor.size, ts)) != sizes:
            for i, (r, t) in enumerate(zip(reference, ts)):
                if t.shape != r.shape:
                    raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)}, expected {tuple(r.shape)} "
                                     "(the shape of its parameter)")


def check_scalars(op: str, reference: list[torch.Tensor], name: str, ts: list[torch.Tensor]) -> None:
    """One one-element tensor per reference tensor (AdamW's step counters)."""
    if len(ts) != len(reference):
        raise ValueError(f"{op}: {name} has {len(ts)} tensors, expected {len(reference)} (one per parameter)")
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            raise ValueError(f"{op}: {name}[{i}] must be a one-element tensor")


def mixed_precision_total(total: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A reduction over a list: fp64 when every tensor is fp64, else fp32 (the documented result dtype).

    Each bucket's partial sum is fp32, or fp64 for an fp64 bucket (see ``scalar_dtype``); adding them
    would promote a mixed list's total to fp64.
    """
    if total.dtype == torch.float64 and any(t.dtype != torch.float64 for t in tensors):
        return total.float()
    return total
