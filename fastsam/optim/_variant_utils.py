"""Pieces GSAM and LookSAM share: gradient buffers, buckets, and option names that clash."""

from __future__ import annotations

import inspect
import warnings

import torch

from fastsam import ops


def buckets_of(params: list) -> dict[tuple[torch.device, torch.dtype], list]:
    """``params`` grouped by (device, dtype), in first-seen order."""
    out: dict[tuple[torch.device, torch.dtype], list] = {}
    for p in params:
        out.setdefault((p.device, p.dtype), []).append(p)
    return out


def copy_grads_to_buffers(backend: str, params: list, cache: dict) -> dict:
    """``{p: buffer}`` with each buffer holding a copy of ``p.grad``; buffers in ``cache`` are reused.

    One fused copy per (device, dtype) bucket (the ``restore`` op is an exact in-place copy).
    """
    out = {}
    for p in params:
        buf = cache.get(p)
        g = p.grad
        if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
            buf = torch.empty_like(g, memory_format=torch.preserve_format)
        out[p] = buf
    for (device, dtype), ps in buckets_of(params).items():
        _, copy = ops.resolve("restore", backend, device, dtype)
        copy([out[p] for p in ps], [p.grad for p in ps])
    return out


def check_ops_registered(opt_name: str, backend: str, op_names: tuple[str, ...]) -> None:
    """At construction: an explicitly requested backend must implement every op the variant uses.

    (``auto`` falls back per op and per bucket, so it always can.)
    """
    if backend == "auto":
        return
    missing = [op for op in op_names if backend not in ops.implementations(op)]
    if missing:
        raise ops.BackendUnavailableError(
            f"{opt_name} with backend={backend!r}: the {backend} backend has no implementation of "
            f"{', '.join(missing)} yet; use backend='auto' (falls back to torch for those ops) or 'torch'")


def resolve_for(backend: str, op_name: str, buckets) -> dict:
    """``{(device, dtype): fn}`` for every bucket, resolved before anything is computed or modified."""
    return {key: ops.resolve(op_name, backend, *key)[1] for key in buckets}


def reject_sparse(opt_name: str, params: list) -> None:
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(f"{opt_name} does not support sparse gradients (parameter of shape "
                               f"{tuple(p.shape)}); the weights were restored")


def materialize_params(params) -> list:
    """A list of the params argument (a generator can be read only once)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param-group dicts, not a tensor")
    return list(params)


def warn_if_base_option_shadowed(variant: str, base_optimizer, option: str, params: list) -> None:
    """Warn when the base optimizer class has an option named like one of the variant's own.

    [note: options both a variant and its base optimizer take]
    GSAM and LookSAM take ``alpha``; so does ``torch.optim.RMSprop`` (its smoothing constant). Every
    keyword a variant does not know goes to the base optimizer, so ``alpha=`` cannot reach both: it
    is always the variant's. The base optimizer's option can still be set per param group (the
    groups are shared with the base optimizer, and variants keep their own ``alpha`` out of the
    groups) or by passing an already built base optimizer. When neither is done the base silently
    keeps its default, so say so once, at construction.
    """
    if not isinstance(base_optimizer, type):
        return  # an instance: its options were set when it was built
    try:
        takes = option in inspect.signature(base_optimizer.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if not takes:
        return
    if params and all(isinstance(g, dict) and option in g for g in params):
        return
    warnings.warn(f"{variant}'s {option}= is its own hyper-parameter; {base_optimizer.__name__}'s option of the "
                  f"same name keeps its default. To set it, put '{option}' in the param groups "
                  f"(e.g. {{'params': ..., '{option}': ...}}) or pass a built {base_optimizer.__name__} instance "
                  f"as base_optimizer.", UserWarning, stacklevel=3)
