"""Checks every fastsam optimizer shares for its param groups and checkpoints (issue 12).

[note: what load_state_dict checks]
torch's Optimizer.load_state_dict checks the number of groups and of parameters per group, then
casts every state tensor to its parameter's device (and dtype, for floating parameters) without
looking at shapes: a buffer of the wrong shape surfaces at the next step, and in a fused kernel that
walks raw memory it writes out of bounds. So before anything is loaded, :func:`checked_state_dict`
checks: every state entry under a key that holds one value per parameter element
(:data:`PARAM_SHAPED_STATE`) has the parameter's shape and a floating (complex, for complex
parameters) dtype; a ``step`` is one element; a state that is not empty has every key the
optimizer's step reads (``complete``); every merged param group passes the optimizer's own group
check. :func:`atomic_load` then runs the load and, if anything still fails, puts the optimizer back
exactly as it was.

Param-group keys the checkpoint lacks (a stock torch optimizer's has no ``rho``/``adaptive``/``eta``,
a davda54/sam one has ``rho``/``adaptive`` only) keep the values the optimizer has, i.e. the ones it
was built with or set since.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# State keys of torch's optimizers (and fastsam's) that hold one value per parameter element.
PARAM_SHAPED_STATE = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg",
                                "acc_delta", "grad_avg", "ax", "prev", "step_size", "exp_inf"})
# davda54/sam and its forks keep the weights' backup in the optimizer state under this key; it is
# stale in a checkpoint (fastsam keeps its backups outside the state), so it is not loaded.
FOREIGN_BACKUP_KEYS = ("old_p",)

# The perturbation scale rho / (norm + eps) is computed in fp32 (fp64 for fp64 parameters). A zero
# gradient has norm 0, so eps alone must keep the scale finite: eps a normal fp32 number, and
# rho / eps below fp32's maximum (otherwise inf * 0 turns the weights into NaN).
FP32_TINY = 1.1754943508222875e-38
FP32_MAX = 3.4028234663852886e38


def check_perturb_eps(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < FP32_TINY:
        raise ValueError(f"perturb_eps must be a finite number > 0 (at least {FP32_TINY:.3g}, a normal fp32 "
                         f"number): with a zero gradient rho / (0 + perturb_eps) is the scale; got {value!r}")
    return float(value)


def check_rho_over_eps(rho: float, eps: float) -> None:
    if rho / eps > FP32_MAX:
        raise ValueError(f"rho={rho!r} with perturb_eps={eps!r}: the scale rho / perturb_eps of a zero gradient "
                         "overflows fp32 (inf * 0 would give NaN weights); use a larger perturb_eps")


def group_param_list(param_group: dict) -> list:
    """The tensors of a param group as torch's ``add_param_group`` will see them (named or not)."""
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        return list(params)  # torch raises its own TypeError for sets
    params = param_group["params"] = list(params)  # a generator can be read only once
    return [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]


def check_no_duplicates(param_group: dict, existing_groups: list) -> None:
    """A tensor listed twice (in one group or across groups) would be perturbed twice (length sqrt(2) rho)."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
    seen = {id(p) for g in existing_groups for p in g["params"]}
    for i, p in enumerate(group_param_list(param_group)):
        if id(p) in seen:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else "?"
            raise ValueError(f"parameter {i} of the new param group (shape {shape}) appears more than once "
                             "across the param groups; a SAM-family optimizer would perturb it twice. List each "
                             "parameter once (e.g. deduplicate tied weights)")
        seen.add(id(p))


def checked_state_dict(opt: torch.optim.Optimizer, state_dict: dict, check_group: Callable[[dict], None], *,
                       complete: tuple[str, ...] = (), numeric_step_to_tensor: bool = False) -> dict:
    """A copy of ``state_dict`` ready for torch's loader, or a clear ``ValueError``; modifies nothing.

    ``complete``: keys a non-empty per-parameter state must all have (AdamW's for the fused step).
    ``numeric_step_to_tensor``: an old checkpoint's numeric ``step`` becomes a tensor (as torch's Adam does).
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("load_state_dict() needs an optimizer state dict (a dict with 'state' and 'param_groups')")
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                         f"{len(groups)}")
    merged, labels, id_map = [], {}, {}
    flat = 0
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"loaded state dict's parameter group {gi} has {len(saved['params'])} parameters, "
                             f"this optimizer's has {len(group['params'])}")
        new = dict(saved)
        for k, v in group.items():
            if k not in new:
                new[k] = v  # a key the checkpoint lacks keeps this optimizer's value
        check_group(new)
        merged.append(new)
        names = group.get("param_names")
        for j, (p, saved_id) in enumerate(zip(group["params"], saved["params"])):
            name = f", name {names[j]!r}" if names and j < len(names) else ""
            labels[saved_id] = f"parameter {flat} (group {gi}, position {j}{name})"
            id_map[saved_id] = p
            flat += 1
    state = {}
    for k, entry in state_dict["state"].items():
        p = id_map.get(k)
        if p is None:
            state[k] = entry  # torch keeps entries it cannot map; so do we
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"the saved state of {labels[k]} must be a dict, got {type(entry).__name__}")
        entry = {key: v for key, v in entry.items() if key not in FOREIGN_BACKUP_KEYS}
        for key, v in entry.items():
            if key in PARAM_SHAPED_STATE:
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"state {key!r} of {labels[k]} must be a tensor, got {type(v).__name__}")
                kind_ok = v.is_complex() if p.is_complex() else v.is_floating_point()
                if v.shape != p.shape or not kind_ok:
                    raise ValueError(f"state {key!r} of {labels[k]} has shape {tuple(v.shape)} and dtype {v.dtype}, "
                                     f"but the parameter has shape {tuple(p.shape)} and dtype {p.dtype}; was the "
                                     "checkpoint saved for a model of another size?")
            elif key == "step":
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    if numeric_step_to_tensor:
                        entry[key] = torch.tensor(float(v), dtype=torch.float32)
                elif not isinstance(v, torch.Tensor) or v.numel() != 1:
                    raise ValueError(f"state 'step' of {labels[k]} must be a number or a one-element tensor, "
                                     f"got {v!r}")
        if complete and entry:
            missing = [key for key in complete if key not in entry]
            if missing:
                raise ValueError(f"the saved state of {labels[k]} lacks {missing} (it has {sorted(entry)}); the "
                                 "checkpoint is incomplete")
        if entry:
            state[k] = entry
    out = dict(state_dict)
    out["param_groups"], out["state"] = merged, state
    return out


def atomic_load(opt: torch.optim.Optimizer, load: Callable[[], None], mutable=()) -> None:
    """Run ``load()``; if it raises, put ``opt``'s attributes back as they were, then re-raise.

    torch's loader replaces ``param_groups`` and ``state`` with new objects, so keeping references
    to the old ones is enough for them; ``mutable`` lists objects that the load changes in place
    (their ``__dict__`` is saved and put back, a ``variant`` dict inside copied).
    """
    saved_attrs = dict(opt.__dict__)
    saved_mutable = []
    for obj in mutable:
        d = dict(obj.__dict__)
        if isinstance(d.get("variant"), dict):
            d["variant"] = dict(d["variant"])
        saved_mutable.append((obj, d))
    try:
        load()
    except BaseException:
        opt.__dict__.clear()
        opt.__dict__.update(saved_attrs)
        for obj, d in saved_mutable:
            obj.__dict__.clear()
            obj.__dict__.update(d)
        raise
