"""Tie SAM's radius ``rho`` to the learning-rate schedule, as GSAM does (Zhuang et al., ICLR 2022).

GSAM's analysis wants the perturbation radius to shrink with the learning rate, so the paper
schedules it proportionally:

    rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)

:class:`RhoScheduler` reads each param group's current ``lr`` (after the LR scheduler has moved it)
and writes that group's ``rho``. It works with any fastsam optimizer (``SAM``, ``ASAM``, ``GSAM``,
...), since they all read ``rho`` from the param groups at every step.
"""

from __future__ import annotations

import math


def _check_value(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class RhoScheduler:
    r"""Set every param group's ``rho`` from its learning rate: ``rho_t`` linear in ``lr_t``.

    Args:
        optimizer: a fastsam optimizer (its param groups carry ``rho``).
        rho_min: ``rho`` when ``lr_t = lr_min``.
        rho_max: ``rho`` when ``lr_t = lr_max``; default: each group's ``rho`` when the scheduler is built.
        lr_min: the schedule's lowest learning rate (0 for cosine decay to 0).
        lr_max: the schedule's highest learning rate; default: each group's ``initial_lr`` (set by
            torch's LR schedulers) or else its current ``lr``.

    ``rho_t`` is clamped to ``[rho_min, rho_max]`` (a warm-up or an lr below ``lr_min`` never makes it
    negative). With ``lr_max == lr_min`` it stays at ``rho_max``. Call :meth:`step` after the LR
    scheduler's ``step()``; it runs once at construction too. A tensor ``lr`` is read with
    ``float()`` here, outside the optimizer step::

        opt = fastsam.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, momentum=0.9)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        rho_sched = fastsam.RhoScheduler(opt, rho_min=0.01)      # rho 0.05 at lr 0.1 -> 0.01 at lr 0
        for epoch in range(epochs):
            ...
            lr_sched.step()
            rho_sched.step()
    """

    def __init__(self, optimizer, rho_min: float = 0.0, rho_max: float | None = None, lr_min: float = 0.0,
                 lr_max: float | None = None):
        groups = getattr(optimizer, "param_groups", None)
        if not groups or any("rho" not in g for g in groups):
            raise TypeError("RhoScheduler needs a fastsam optimizer (param groups with 'rho'), got "
                            f"{type(optimizer).__name__}")
        rho_min = _check_value("rho_min", rho_min)
        lr_min = _check_value("lr_min", lr_min)
        rho_maxes = [_check_value("rho_max", g["rho"] if rho_max is None else rho_max) for g in groups]
        lr_maxes = [_check_value("lr_max", float(g.get("initial_lr", g["lr"])) if lr_max is None else lr_max)
                    for g in groups]
        for r in rho_maxes:
            if r < rho_min:
                raise ValueError(f"rho_max ({r}) must be >= rho_min ({rho_min})")
        for lr in lr_maxes:
            if lr < lr_min:
                raise ValueError(f"lr_max ({lr}) must be >= lr_min ({lr_min})")
        self.optimizer = optimizer
        self.rho_min, self.lr_min = rho_min, lr_min
        self.rho_max, self.lr_max = rho_maxes, lr_maxes
        self.last_rho: list[float] = []
        self.step()

    def rho_for(self, lr: float, group_index: int = 0) -> float:
        """The ``rho`` a group gets at learning rate ``lr``."""
        rho_max, lr_max = self.rho_max[group_index], self.lr_max[group_index]
        if lr_max <= self.lr_min:
            return rho_max
        frac = min(max((float(lr) - self.lr_min) / (lr_max - self.lr_min), 0.0), 1.0)
        return self.rho_min + (rho_max - self.rho_min) * frac

    def step(self) -> list[float]:
        """Write each group's ``rho`` from its current ``lr``; returns the new values."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.rho_max):
            raise RuntimeError(f"the optimizer has {len(groups)} param groups but the scheduler was built for "
                               f"{len(self.rho_max)}; build a new RhoScheduler after add_param_group()")
        self.last_rho = [self.rho_for(g["lr"], i) for i, g in enumerate(groups)]
        for g, rho in zip(groups, self.last_rho):
            g["rho"] = rho
        return list(self.last_rho)

    def get_last_rho(self) -> list[float]:
        return list(self.last_rho)

    def state_dict(self) -> dict:
        return {"rho_min": self.rho_min, "rho_max": list(self.rho_max), "lr_min": self.lr_min,
                "lr_max": list(self.lr_max), "last_rho": list(self.last_rho)}

    def load_state_dict(self, state_dict: dict) -> None:
        rho_max, lr_max = list(state_dict["rho_max"]), list(state_dict["lr_max"])
        if len(rho_max) != len(self.optimizer.param_groups) or len(lr_max) != len(rho_max):
            raise ValueError("the saved RhoScheduler was built for a different number of param groups")
        self.rho_min, self.lr_min = float(state_dict["rho_min"]), float(state_dict["lr_min"])
        self.rho_max, self.lr_max = [float(r) for r in rho_max], [float(lr) for lr in lr_max]
        self.last_rho = list(state_dict.get("last_rho", []))

    def __repr__(self) -> str:
        return f"RhoScheduler(rho_min={self.rho_min}, rho_max={self.rho_max}, lr_min={self.lr_min}, " \
               f"lr_max={self.lr_max})"
