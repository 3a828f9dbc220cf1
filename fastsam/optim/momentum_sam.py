"""Momentum-SAM (Becker, Altrock & Risse, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", 2024; authors' code: github.com/MarlonBecker/MSAM).

SAM perturbs along a fresh gradient and so needs a second forward/backward. Momentum-SAM perturbs
along the momentum buffer instead, which is already there: with ``v`` the momentum and
``s = rho / (||v|| + eps)`` (global norm over every parameter of the optimizer), the weights are kept
at the ascent point ``w~ = w - s v`` between steps, so the step's single forward/backward gives the
gradient at the perturbed point. One step of the SGD form (``MomentumSAM``), ``g = grad L(w~)``::

    d     = g + weight_decay * w~            (decay at the point the gradient was taken, as the authors)
    w     = w~ + s_old v                     (back from the ascent point)
    v     = momentum v + d
    w     = w - lr v                         (nesterov: w - lr (d + momentum v))
    s_new = rho / (||v|| + eps)
    w~    = w - s_new v                      (the next ascent point)

The AdamW form (``MomentumSAMAdamW``, the authors' ``AdamW_MSAM``) moves along the first moment
``m``: back by ``s_old m``, Adam moments and bias-corrected step, then decoupled decay
``w *= 1 - lr * weight_decay`` applied *after* the Adam step (the authors' order), then
``w~ = w - s_new m`` with ``s_new = rho / (||m|| + eps)``.

Everything before the norm is one fused op per (param group, device, dtype) bucket
(``fastsam.ops.momentum_sam_sgd_`` / ``momentum_sam_adamw_``, which also return the new momentum's
squared norm); the move to the new ascent point is a second (``momentum_sam_shift_``). No extra
forward/backward and no host synchronisation: the norm and the scales stay on the device.

The authors' SGD class accepts ``nesterov`` but ignores it; here ``nesterov=True`` uses torch's
Nesterov step for the descent (the perturbation still follows ``v``). With ``nesterov=False`` (the
default) the trajectory is the authors'.

Evaluation and checkpoints: the model holds ``w~``, not ``w``. ``with opt.unperturbed():`` moves the
weights to ``w`` (backing ``w~`` up) and restores ``w~`` bit for bit on exit, also when the body
raises; ``move_back()`` / ``move_up()`` are the same two halves (the authors'
``move_back_from_momentumAscent`` / ``move_up_to_momentumAscent``). To resume training, save the
model as it is (at ``w~``) with ``opt.state_dict()``, which holds the momentum and the scales
``s_old`` (``state_dict()["fastsam"]``); to ship weights for inference, save them inside
``unperturbed()``. BatchNorm running statistics are gathered at ``w~`` during training; the authors'
script recomputes them at ``w`` with one forward-only pass over the training data at the end
(``with opt.unperturbed(): torch.optim.swa_utils.update_bn(loader, model)``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from fastsam import ops

from . import _checkpoint


def _check(name: str, value, lo: float = 0.0, hi: float | None = None, hi_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bound = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
        raise ValueError(f"{name} must be a finite number >= {lo}{bound}, got {value!r}")
    return float(value)


@dataclass
class _AscentState:
    """The host-side bookkeeping of the ascent point (see [note: optimizer attributes under torch.compile])."""

    scales: list = field(default_factory=list)  # per group: s_old, a 0-dim fp32 device tensor, or None (s = 0)
    steps: int = 0
    backups: dict | None = None  # set while moved back (unperturbed weights in place): {p: backup of w~}


class _MomentumSAMBase(torch.optim.Optimizer):
    """What the SGD and AdamW forms share: buckets, the ascent point, the context manager, state."""

    _BUFFER = "momentum_buffer"  # the state key of the direction the ascent follows

    def __init__(self, params, defaults: dict, perturb_eps: float, backend: str | None):
        self.perturb_eps = _checkpoint.check_perturb_eps(perturb_eps)
        self.backend = ops.check_backend(backend)
        super().__init__(params, defaults)
        self._ascent = _AscentState(scales=[None] * len(self.param_groups))

    # ------------------------------------------------------------------ validation

    def _check_group(self, group) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        _checkpoint.check_no_duplicates(param_group, self.__dict__.get("param_groups", []))
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        ascent = self.__dict__.get("_ascent")
        if ascent is not None:
            ascent.scales.append(None)

    # ------------------------------------------------------------------ the step

    def _phase1(self, group, params, grads, s_old) -> torch.Tensor:
        """The fused update of one bucket; returns the new direction's squared norm (device)."""
        raise NotImplementedError

    def _init_state(self, p) -> None:
        raise NotImplementedError

    def _bucket_key(self, p):
        return (p.get_device(), p.dtype)

    def _plan(self):
        """Per group: (buckets {key: (params, grads)}, stale params with a direction but no gradient)."""
        plan = []
        for group in self.param_groups:
            self._check_group(group)
            buckets, stale = {}, []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    if self._BUFFER in self.state.get(p, {}):
                        stale.append(p)
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter of shape {tuple(p.shape)})")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(f"the gradient of a parameter of shape {tuple(p.shape)} does not match it in "
                                     "shape, dtype or device")
                ps, gs = buckets.setdefault(self._bucket_key(p), ([], []))
                ps.append(p)
                gs.append(g)
            plan.append((group, buckets, stale))
        return plan

    def _zero(self, device) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(self, closure=None):
        """One Momentum-SAM step from the gradients in ``.grad`` (taken at the ascent point ``w~``).

        ``closure`` (optional, as for any torch optimizer) recomputes the loss and its gradients; it is
        called first, with gradients enabled. Returns its loss.
        """
        if self._ascent.backups is not None:
            raise RuntimeError(f"{type(self).__name__}.step() while the weights are moved back to the unperturbed "
                               "point (inside unperturbed() or after move_back()); call move_up() first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()  # validates everything before anything is modified
        for group, buckets, _ in plan:
            for ps, _ in buckets.values():
                for p in ps:
                    if self._BUFFER not in self.state[p]:
                        self._init_state(p)
        scales = self._ascent.scales
        total = None
        for gi, (group, buckets, stale) in enumerate(plan):
            s_old = scales[gi]
            for ps, gs in buckets.values():
                s = s_old if s_old is not None else self._zero(ps[0].device)
                part = self._phase1(group, ps, gs, s)
                total = part if total is None else total + part.to(total.device, non_blocking=True)
            if stale:
                bufs = [self.state[p][self._BUFFER] for p in stale]
                if s_old is not None:
                    ops.momentum_sam_shift_(stale, bufs, s_old, backend=self.backend)  # back to w; no update
                part = ops.grad_sq_norm(bufs, backend=self.backend)
                total = part if total is None else total + part.to(total.device, non_blocking=True)
        if total is None:
            return loss  # no gradients and no directions: nothing to do
        norm = total.sqrt()
        new_scales = []
        for gi, (group, buckets, stale) in enumerate(plan):
            ps = [p for bps, _ in buckets.values() for p in bps] + stale
            if not ps:
                new_scales.append(scales[gi])
                continue
            s_new = float(group["rho"]) / (norm + self.perturb_eps)
            ops.momentum_sam_shift_(ps, [self.state[p][self._BUFFER] for p in ps], -s_new, backend=self.backend)
            new_scales.append(s_new)
        self._ascent.scales = new_scales
        self._ascent.steps += 1
        return loss

    # ------------------------------------------------------------------ the unperturbed weights

    def _moved(self):
        """Per group: (params with a direction, their directions, that group's s_old) where s_old is set."""
        out = []
        for gi, group in enumerate(self.param_groups):
            s = self._ascent.scales[gi]
            ps = [p for p in group["params"] if self._BUFFER in self.state.get(p, {})]
            if s is not None and ps:
                out.append((ps, [self.state[p][self._BUFFER] for p in ps], s))
        return out

    @torch.no_grad()
    def move_back(self) -> None:
        """Move the weights from the ascent point ``w~`` to the unperturbed ``w = w~ + s v`` (backing ``w~`` up).

        The authors' ``move_back_from_momentumAscent``. Until ``move_up()``, ``step()`` refuses to run.
        """
        if self._ascent.backups is not None:
            raise RuntimeError("move_back() called twice; the weights are already at the unperturbed point")
        backups = {}
        for ps, bufs, s in self._moved():
            bs = [torch.empty_like(p, memory_format=torch.preserve_format) for p in ps]
            ops.momentum_sam_shift_(ps, bufs, s, bs, backend=self.backend)
            backups.update(zip(ps, bs))
        self._ascent.backups = backups

    @torch.no_grad()
    def move_up(self) -> None:
        """Return to the ascent point ``w~`` saved by ``move_back()``, bit for bit (an in-place copy).

        The authors' ``move_up_to_momentumAscent``. The weights must not be changed in between: they
        are overwritten with the saved ``w~``.
        """
        backups = self._ascent.backups
        if backups is None:
            raise RuntimeError("move_up() without a preceding move_back(); the weights are at the ascent point")
        if backups:
            ops.restore_(list(backups), list(backups.values()), backend=self.backend)
        self._ascent.backups = None

    @contextlib.contextmanager
    def unperturbed(self):
        """Context manager: the unperturbed weights ``w`` inside (evaluation, checkpoints), ``w~`` after.

        The ascent point is restored on exit whatever happens inside.
        """
        self.move_back()
        try:
            yield self
        finally:
            self.move_up()

    # ------------------------------------------------------------------ state

    EXTRA_STATE_KEY = "fastsam"

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[self.EXTRA_STATE_KEY] = {"steps": self._ascent.steps,
                                    "scales": [None if s is None else s.detach().clone() for s in self._ascent.scales]}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if self._ascent.backups is not None:
            raise RuntimeError("load_state_dict() while moved back to the unperturbed weights; call move_up() first")
        # Checked first (shapes of every state tensor, merged groups), then loaded all-or-nothing:
        # see [note: what load_state_dict checks] in _checkpoint.py.
        checked = _checkpoint.checked_state_dict(self, state_dict, self._check_group)
        extra = state_dict.get(self.EXTRA_STATE_KEY) or {}
        scales = extra.get("scales")
        if scales is not None and len(scales) != len(state_dict["param_groups"]):
            raise ValueError(f"the state dict has {len(scales)} ascent scales for {len(state_dict['param_groups'])} "
                             "param groups")
        _checkpoint.atomic_load(self, lambda: self._load_checked(checked, extra, scales))

    def _load_checked(self, state_dict: dict, extra: dict, scales) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != self.EXTRA_STATE_KEY})
        for group in self.param_groups:
            self._check_group(group)
        # A state dict without scales (e.g. a stock SGD's, whose weights are unperturbed) starts at s = 0.
        scales = scales or [None] * len(self.param_groups)
        out = []
        for group, s in zip(self.param_groups, scales):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            out.append(None if s is None else torch.as_tensor(s).to(device=device).clone())
        self._ascent = _AscentState(scales=out, steps=int(extra.get("steps", 0)))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in ("_ascent", "backend", "perturb_eps") if k in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_ascent" not in self.__dict__:
            self._ascent = _AscentState(scales=[None] * len(self.param_groups))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, groups={len(self.param_groups)})"


class MomentumSAM(_MomentumSAMBase):
    r"""Momentum-SAM, SGD form: perturbation along ``-rho v / ||v||``, one forward/backward per step.

    Args (defaults are the authors'):
        params: parameters or param groups (groups may set their own ``lr``, ``rho``, ...).
        lr: learning rate.
        momentum: momentum ``mu`` (``v = mu v + d``, torch's convention, no dampening).
        weight_decay: L2 decay added to the gradient, ``d = g + weight_decay * w~``.
        nesterov: torch's Nesterov descent (the authors' code ignores this flag; see the module docstring).
        rho: the ascent radius.
        perturb_eps: ``eps`` in ``rho / (||v|| + eps)``.
        backend: fastsam backend, ``"auto"`` (default), ``"torch"``, ...

    Use it like ``torch.optim.SGD`` (``loss.backward(); opt.step(); opt.zero_grad()``) and evaluate
    inside ``with opt.unperturbed():``. ``state`` keeps ``momentum_buffer`` per parameter, as SGD's.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-2,
                 nesterov: bool = False, rho: float = 0.3, *, perturb_eps: float = 1e-12,
                 backend: str | None = "auto"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, rho=rho)
        self._check_group(defaults)
        super().__init__(params, defaults, perturb_eps, backend)

    def _check_group(self, group) -> None:
        _check("lr", group.get("lr"))
        _check("momentum", group.get("momentum"), 0.0, 1.0)
        _check("weight_decay", group.get("weight_decay"))
        _check("rho", group.get("rho"))
        if not isinstance(group.get("nesterov"), bool):
            raise ValueError(f"nesterov must be a bool, got {group.get('nesterov')!r}")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")

    def _init_state(self, p) -> None:
        self.state[p][self._BUFFER] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _phase1(self, group, params, grads, s_old) -> torch.Tensor:
        bufs = [self.state[p][self._BUFFER] for p in params]
        return ops.momentum_sam_sgd_(params, grads, bufs, s_old=s_old, lr=float(group["lr"]),
                                     momentum=float(group["momentum"]), weight_decay=float(group["weight_decay"]),
                                     nesterov=group["nesterov"], backend=self.backend)


class MomentumSAMAdamW(_MomentumSAMBase):
    r"""Momentum-SAM, AdamW form (the authors' ``AdamW_MSAM``): ascent along ``-rho m / ||m||``.

    Args (defaults are the authors'): ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``weight_decay=1e-2`` (decoupled, applied after the Adam step), ``rho=1.0``; ``perturb_eps`` and
    ``backend`` as for :class:`MomentumSAM`. ``state`` keeps ``exp_avg``, ``exp_avg_sq`` and an int
    ``step`` per parameter, as the authors' class.
    """

    _BUFFER = "exp_avg"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 rho: float = 1.0, *, perturb_eps: float = 1e-12, backend: str | None = "auto"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, eps=eps,
                        weight_decay=weight_decay, rho=rho)
        self._check_group(defaults)
        super().__init__(params, defaults, perturb_eps, backend)

    def _check_group(self, group) -> None:
        _check("lr", group.get("lr"))
        _check("eps", group.get("eps"))
        _check("weight_decay", group.get("weight_decay"))
        _check("rho", group.get("rho"))
        betas = group.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        for name, b in zip(("betas[0]", "betas[1]"), betas):
            _check(name, b, 0.0, 1.0, hi_open=True)

    def _init_state(self, p) -> None:
        st = self.state[p]
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _bucket_key(self, p):
        # One op per (device, dtype, step): parameters that missed steps keep their own bias correction.
        st = self.state.get(p, {})
        return (p.get_device(), p.dtype, int(st.get("step", 0)))

    def _phase1(self, group, params, grads, s_old) -> torch.Tensor:
        states = [self.state[p] for p in params]
        step = int(states[0]["step"]) + 1
        for st in states:
            st["step"] = step
        beta1, beta2 = group["betas"]
        return ops.momentum_sam_adamw_(params, grads, [st["exp_avg"] for st in states],
                                       [st["exp_avg_sq"] for st in states], s_old=s_old, lr=float(group["lr"]),
                                       beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                                       weight_decay=float(group["weight_decay"]), step=step, backend=self.backend)
