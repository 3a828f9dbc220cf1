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
