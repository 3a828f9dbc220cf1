"""SAMPa (Xie, Pethick & Cevher, "SAMPa: Sharpness-aware Minimization Parallelized", NeurIPS 2024;
authors' code: github.com/LIONS-EPFL/SAMPa): SAM whose two gradients are independent, so two
devices compute them at the same time.

SAM's perturbation needs ``grad f(w_t)`` before ``grad f(w_t + e)`` can start. SAMPa perturbs along
the gradient at an auxiliary point ``y_t`` instead, which the previous step already computed::

    w~_t     = w_t + rho * grad f(y_t) / ||grad f(y_t)||         rank 0: g_p = grad f(w~_t)
    y_{t+1}  = w_t - lr * (grad f(y_t) + wd w_t + mu buf)        rank 1: g_y = grad f(y_{t+1})
    update   = (1 - lam) g_p + lam g_y                           SAMPa-lam; the base SGD step with it

Both gradients depend only on ``w_t`` and ``grad f(y_t)``, so rank 0 and rank 1 (each a full replica
with the same batch) compute them concurrently and exchange them with **one collective per step**
(an all-gather of one flat gradient per rank: the bytes of the authors' all-reduce, and exact, so
both replicas apply bit-identical updates). ``y_{t+1}`` is the step SGD would take with
``grad f(y_t)`` (momentum and weight decay included, the buffer not updated), as in the authors'
code. ``grad f(y_0) = 0``, so step 0's perturbation is zero. Defaults: ``rho = 0.1``, ``lam = 0.2``
(the authors' SAMPa-0.2).

Without an initialised process group (or with ``parallel=False``) one process computes both
gradients in turn: the same update, the reference the two-process run is tested against, and a way
to run SAMPa anywhere (at SAM's cost).

Differences from the authors' code, on purpose: both gradients of step ``t`` use the step's batch
(the authors evaluate ``w~_t`` on the previous batch, the one ``grad f(y_t)`` came from), which keeps
``step(closure)`` the usual one-batch call and makes a resumed run continue exactly (``grad f(y_t)``
is in ``state_dict()``). BatchNorm running statistics are each rank's own (the ranks run forwards
at different points); buffers are not synchronised.

No host synchronisation: the norm stays on the device; the collective is the only wait.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastsam import ops

from . import _checkpoint
from ._variant_utils import materialize_params


class SAMPa(torch.optim.Optimizer):
    r"""SAMPa-lam on two ranks (``torch.distributed``, gloo or NCCL), or in one process.

    Args:
        params: parameters or param groups (groups may set ``rho`` besides SGD's options).
        base_optimizer: ``torch.optim.SGD`` (the class; SAMPa's extrapolation is SGD's step).
        rho: perturbation radius.
        lam: weight of the auxiliary gradient in the update, in [0, 1] (0 is plain SAMPa).
        process_group: the two-rank group to use (default: the default group, which must have 2 ranks).
        parallel: ``None`` (default) runs on two ranks when a process group is initialised, in one
            process otherwise; ``False`` forces one process.
        backend: fastsam backend for the element-wise work.
        **kwargs: SGD's options (``lr``, ``momentum``, ``weight_decay``; no Nesterov, no dampening).

    Every rank calls ``loss = opt.step(closure)`` with the same batch; ``closure()`` zeroes nothing,
    runs forward and backward on the batch and returns the loss (at the rank's own point: ``w~_t`` on
    rank 0, ``y_{t+1}`` on rank 1; in one process, the loss at ``w~_t``). Every parameter that
    requires a gradient must get one. The weights are ``w_t`` again whenever ``step`` returns,
    also when the closure raises.
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.1, lam: float = 0.2, *,
                 process_group=None, parallel: bool | None = None, backend: str | None = "auto", **kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.SGD)):
            raise TypeError(f"SAMPa's extrapolation is an SGD step: base_optimizer must be torch.optim.SGD, "
                            f"got {base_optimizer!r}")
        for name, v in (("rho", rho),):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
            raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
        if kwargs.get("nesterov") or kwargs.get("dampening", 0) != 0:
            raise ValueError("SAMPa supports SGD without Nesterov momentum and without dampening")
        if parallel not in (None, True, False):
            raise ValueError(f"parallel must be None, True or False, got {parallel!r}")
        self.backend = ops.check_backend(backend)
        params = materialize_params(params)
        super().__init__(params, dict(rho=float(rho), **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.lam = float(lam)
        self.process_group = process_group
        if parallel is None:
            parallel = dist.is_available() and dist.is_initialized()
        if parallel:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("SAMPa(parallel=True) needs an initialised torch.distributed process group")
            size = dist.get_world_size(process_group)
            if size != 2:
                raise ValueError(f"SAMPa runs on exactly two ranks (one per gradient); the process group has {size}")
        self.parallel = bool(parallel)
        self.rank = dist.get_rank(process_group) if self.parallel else None
        ps = self._params()
        if not ps:
            raise ValueError("SAMPa got no parameter that requires a gradient")
        if len({(p.device, p.dtype) for p in ps}) != 1:
            raise ValueError("SAMPa keeps one flat gradient buffer: every parameter must share one device and dtype")
        self._numel = sum(p.numel() for p in ps)
        self._gy = torch.zeros(self._numel, device=ps[0].device, dtype=ps[0].dtype)  # grad f(y_t), flat
        self._backups = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in ps]
        self._steps = 0

    # ------------------------------------------------------------------ helpers

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (each tensor once across all groups); the flat buffers grow to cover it."""
        _checkpoint.check_no_duplicates(param_group, self.__dict__.get("param_groups", []))
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        self._check_group(param_group)
        new = [p for p in _checkpoint.group_param_list(param_group) if p.requires_grad]
        if any(p.device != self._gy.device or p.dtype != self._gy.dtype for p in new):
            raise ValueError("SAMPa keeps one flat gradient buffer: every parameter must share one device and dtype")
        base.add_param_group(param_group)  # appends to the shared list of groups
        n = sum(p.numel() for p in new)
        self._gy = torch.cat([self._gy, self._gy.new_zeros(n)])  # grad f(y) of a new parameter: 0
        self._backups = self._backups + [torch.empty_like(p, memory_format=torch.contiguous_format) for p in new]
        self._numel += n

    def _check_group(self, group) -> None:
        rho = group.get("rho")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        if group.get("nesterov") or group.get("dampening", 0) != 0:
            raise ValueError("SAMPa supports SGD without Nesterov momentum and without dampening")
        if group.get("maximize"):
            raise ValueError("SAMPa does not support maximize=True")

    def _params(self) -> list:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _views(self, flat: torch.Tensor) -> list:
        out, start = [], 0
        for p in self._params():
            n = p.numel()
            out.append(flat[start:start + n].view(p.shape))
            start += n
        return out

    def _group_slices(self):
        """(group, its params, their indices in the flat order) per group."""
        out, i = [], 0
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.requires_grad]
            out.append((g, ps, list(range(i, i + len(ps)))))
            i += len(ps)
        return out

    def _move(self, role: int) -> None:
        """Back ``w_t`` up and move to rank ``role``'s point (0: ``w~_t``, 1: ``y_{t+1}``)."""
        gy = self._views(self._gy)
        if role == 0:
            norm = ops.grad_norm(gy, backend=self.backend)
        for group, ps, idx in self._group_slices():
            if not ps:
                continue
            d, bk = [gy[i] for i in idx], [self._backups[i] for i in idx]
            if role == 0:
                ops.perturb_(ps, d, bk, norm, float(group["rho"]), backend=self.backend)
            else:
                bufs = [self.state[p].get("momentum_buffer") for p in ps]
                bufs = bufs if all(b is not None for b in bufs) and group["momentum"] else []
                ops.sampa_extrapolate_(ps, d, bk, bufs, lr=float(group["lr"]), momentum=float(group["momentum"]),
                                       weight_decay=float(group["weight_decay"]), backend=self.backend)

    def _branch(self, role: int, closure, out: torch.Tensor):
        """The gradient at rank ``role``'s point, packed into ``out``; the weights are ``w_t`` afterwards."""
        ps = self._params()
        self._move(role)
        try:
            for p in ps:
                p.grad = None
            with torch.enable_grad():
                loss = closure()
        finally:
            ops.restore_(ps, self._backups, backend=self.backend)
        missing = [tuple(p.shape) for p in ps if p.grad is None]
        if missing:
            raise RuntimeError(f"SAMPa: the closure left parameters of shapes {missing[:3]} without a gradient; "
                               "every parameter that requires a gradient must get one (freeze the others)")
        if any(p.grad.is_sparse for p in ps):
            raise RuntimeError("SAMPa does not support sparse gradients")
        ops.restore_(self._views(out), [p.grad for p in ps], backend=self.backend)  # pack (an in-place copy)
        return loss

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One SAMPa step (see the module docstring); returns the closure's loss at this rank's point."""
        if closure is None:
            raise RuntimeError("SAMPa.step() needs a closure that runs forward and backward on the batch and "
                               "returns the loss")
        for group in self.param_groups:
            self._check_group(group)
        ps = self._params()
        gathered = torch.empty(2 * self._numel, device=self._gy.device, dtype=self._gy.dtype)
        g_p, g_y = gathered[:self._numel], gathered[self._numel:]
        if self.parallel:
            mine = g_p if self.rank == 0 else g_y
            loss = self._branch(self.rank, closure, mine)
            send = mine.clone()
            dist.all_gather([g_p, g_y], send, group=self.process_group)  # the step's one collective
        else:
            loss = self._branch(0, closure, g_p)
            self._branch(1, closure, g_y)
        # update = (1 - lam) g_p + lam g_y, into .grad; keep g_y = grad f(y_{t+1}) for the next step.
        ops.restore_([self._gy], [g_y], backend=self.backend)
        ops.grad_mix_([g_p], [g_y], 1.0 - self.lam, self.lam, backend=self.backend)
        ops.restore_([p.grad for p in ps], self._views(g_p), backend=self.backend)
        self.base_optimizer.step()
        self._steps += 1
        return loss

    # ------------------------------------------------------------------ state

    EXTRA_STATE_KEY = "fastsam"

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[self.EXTRA_STATE_KEY] = {"sampa_grad_y": self._gy.clone(), "steps": self._steps, "lam": self.lam}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        # Checked first (every state tensor's shape, the merged groups), then loaded all-or-nothing:
        # see [note: what load_state_dict checks] in _checkpoint.py.
        checked = _checkpoint.checked_state_dict(self, state_dict, self._check_group)
        extra = state_dict.get(self.EXTRA_STATE_KEY) or {}
        gy = extra.get("sampa_grad_y")
        if gy is not None and (not isinstance(gy, torch.Tensor) or gy.numel() != self._numel):
            got = gy.numel() if isinstance(gy, torch.Tensor) else type(gy).__name__
            raise ValueError(f"the saved SAMPa auxiliary gradient has {got} elements, this optimizer's "
                             f"parameters {self._numel}")
        _checkpoint.atomic_load(self, lambda: self._load_checked(checked, gy, extra))

    def _load_checked(self, state_dict: dict, gy, extra: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != self.EXTRA_STATE_KEY})
        self.base_optimizer.state = self.state
        self.base_optimizer.param_groups = self.param_groups
        for group in self.param_groups:
            self._check_group(group)
        self._gy = (torch.zeros_like(self._gy) if gy is None
                    else gy.detach().to(device=self._gy.device, dtype=self._gy.dtype).reshape(-1).clone())
        self._steps = int(extra.get("steps", 0))

    def __repr__(self) -> str:
        mode = f"ranks=2, rank={self.rank}" if self.parallel else "one process"
        return f"SAMPa(lam={self.lam}, {mode}, groups={len(self.param_groups)})"
