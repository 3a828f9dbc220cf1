"""One small case per fastsam optimizer class: how to build it on a tiny model and drive one step.

tests/test_faults.py runs its table of guarantees (checkpoints, faults mid-step, bad input) over
every entry of :data:`CASES`, and checks that every optimizer class fastsam exports has one. A new
optimizer therefore needs one entry here, nothing else.

Contract of an entry (:class:`OptimizerCase`):

* ``name``: a unique test id.
* ``cls``: the class, as exported by ``fastsam`` (several entries may share a class, e.g. SAM and
  interval SAM).
* ``build(params, base_optimizer, **base_kwargs) -> optimizer``: builds it over ``params`` (a list of
  tensors or of param-group dicts) with the given base optimizer class and options. Choose the
  variant's own hyper-parameters here so that one step exercises what is special about it (ESAM's
  SWP and SDS with ``beta, gamma < 1``, GSAM's ``alpha > 0``, LookSAM's cheap steps with ``k > 1``).
* ``drive``: how a step is run.

  - ``"two_call"``: the SAM protocol. The gradient at ``w`` is in ``.grad`` first; then
    ``first_step`` / second forward-backward / ``second_step`` on SAM steps, or only
    ``second_step`` when ``opt.needs_second_pass`` is False (interval SAM, LookSAM); or
    ``opt.step(closure)`` with a closure that runs the second forward/backward.
  - ``"per_sample"``: the optimizer drives the passes (ESAM, MSAM): ``opt.step(closure,
    **step_kwargs(batch_size))`` with ``closure(indices=None) -> per-sample losses``. These classes
    must also accept the two-call form (first_step/second_step are inherited from SAM), which is
    how the tests stop a step half-way.
  - ``"one_pass"``: a plain torch-optimizer step, ``loss.backward(); opt.step()`` (Momentum-SAM,
    which is not a :class:`fastsam.SAM` and keeps its weights at the ascent point between steps).
    The SAM-protocol tests (first_step/second_step faults, ``state_dict`` mid-step) skip these; the
    generic ones (checkpoints, duplicates, ``perturb_eps``, round trip) run for every case.
  - ``"closure_only"``: ``opt.step(closure)`` with a closure that runs forward and backward and
    returns the loss, the optimizer calling it as often as it needs (SAMPa, bSAM: classes that are
    not a :class:`fastsam.SAM`). Skipped by the SAM-protocol tests like ``"one_pass"``.
* ``step_kwargs(batch_size) -> dict``: extra arguments of ``step`` (MSAM's ``batch_size``).
* ``fused_ops``: the ops its ``second_step`` runs besides the restore and the base step, in the
  order they run (``_before_base_step``): the tests inject a failure into each. Cheap-step ops go
  in ``cheap_ops``.

Everything here is tiny on purpose (a 4-5-3 MLP, batches of 8) so the table stays fast on 2 CPU
cores, Triton interpreter included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam

BATCH = 8


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def make_batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32, batch: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, generator=gen).to(dtype), torch.randint(0, 3, (batch,), generator=gen))
            for _ in range(n)]


@dataclass
class OptimizerCase:
    name: str
    cls: type
    build: Callable
    drive: str = "two_call"
    step_kwargs: Callable[[int], dict] = field(default=lambda batch: {})
    fused_ops: tuple[str, ...] = ()
    cheap_ops: tuple[str, ...] = ()

    def __repr__(self) -> str:  # pytest ids
        return self.name


def _one_pass_kwargs(kw: dict, *keep: str) -> dict:
    """Momentum-SAM takes no base optimizer: keep the options it has (lr, momentum, perturb_eps)."""
    return {k: v for k, v in kw.items() if k in keep}


CASES: list[OptimizerCase] = [
    OptimizerCase("SAM", fastsam.SAM, lambda ps, base, **kw: fastsam.SAM(ps, base, rho=0.05, **kw)),
    OptimizerCase("ASAM", fastsam.ASAM, lambda ps, base, **kw: fastsam.ASAM(ps, base, rho=0.5, **kw)),
    OptimizerCase("FisherSAM", fastsam.FisherSAM, lambda ps, base, **kw: fastsam.FisherSAM(ps, base, rho=0.1, **kw)),
    OptimizerCase("IntervalSAM", fastsam.SAM, lambda ps, base, **kw: fastsam.SAM(ps, base, rho=0.05, every=2, **kw)),
    OptimizerCase("ESAM", fastsam.ESAM,
                  lambda ps, base, **kw: fastsam.ESAM(ps, base, rho=0.05, beta=0.6, gamma=0.5, seed=3, **kw),
                  drive="per_sample"),
    OptimizerCase("ESAM-tensor", fastsam.ESAM,
                  lambda ps, base, **kw: fastsam.ESAM(ps, base, rho=0.05, beta=0.6, gamma=0.5, swp="tensor", seed=3,
                                                      **kw),
                  drive="per_sample"),
    OptimizerCase("MSAM", fastsam.MSAM, lambda ps, base, **kw: fastsam.MSAM(ps, base, rho=0.05, micro_batches=2, **kw),
                  drive="per_sample", step_kwargs=lambda batch: {"batch_size": batch}),
    OptimizerCase("GSAM", fastsam.GSAM, lambda ps, base, **kw: fastsam.GSAM(ps, base, rho=0.05, alpha=0.3, **kw),
                  fused_ops=("grad_dot", "gsam_combine")),
    OptimizerCase("MomentumSAM", fastsam.MomentumSAM,
                  lambda ps, base, **kw: fastsam.MomentumSAM(ps, **_one_pass_kwargs(kw, "lr", "momentum",
                                                                                    "perturb_eps")),
                  drive="one_pass"),
    OptimizerCase("MomentumSAMAdamW", fastsam.MomentumSAMAdamW,
                  lambda ps, base, **kw: fastsam.MomentumSAMAdamW(ps, **_one_pass_kwargs(kw, "perturb_eps")),
                  drive="one_pass"),
    OptimizerCase("AESAM", fastsam.AESAM,
                  lambda ps, base, **kw: fastsam.AESAM(ps, base, rho=0.05, total_steps=20, **kw)),
    OptimizerCase("RandomSwitchSAM", fastsam.RandomSwitchSAM,
                  lambda ps, base, **kw: fastsam.RandomSwitchSAM(ps, base, rho=0.05, probability=0.5, seed=3, **kw)),
    OptimizerCase("KSAM", fastsam.KSAM, lambda ps, base, **kw: fastsam.KSAM(ps, base, rho=0.05, gamma=0.5, **kw),
                  drive="per_sample"),
    OptimizerCase("DeltaSAM", fastsam.DeltaSAM,
                  lambda ps, base, **kw: fastsam.DeltaSAM(ps, base, rho=0.05, temperature=1.0, **kw),
                  drive="per_sample"),
    OptimizerCase("AWP", fastsam.AWP, lambda ps, base, **kw: fastsam.AWP(ps, base, rho=0.01, **kw)),
    # WT-AWP: the mix lmbda g(w) + (1 - lmbda) g(w + e), 1-D tensors perturbed too
    OptimizerCase("WT-AWP", fastsam.AWP,
                  lambda ps, base, **kw: fastsam.AWP(ps, base, rho=0.05, lmbda=0.5, perturb_1d=True, **kw),
                  fused_ops=("grad_mix",)),
    # HERO: the Hessian term is a double backward inside step(closure); its second_step is SAM's
    OptimizerCase("HERO", fastsam.HERO, lambda ps, base, **kw: fastsam.HERO(ps, base, rho=0.05, lmbda=1.0, **kw),
                  drive="per_sample"),
    OptimizerCase("WSAM", fastsam.WSAM, lambda ps, base, **kw: fastsam.WSAM(ps, base, rho=0.05, gamma=0.9, **kw)),
    OptimizerCase("FriendlySAM", fastsam.FriendlySAM,
                  lambda ps, base, **kw: fastsam.FriendlySAM(ps, base, rho=0.05, sigma=1.0, lmbda=0.9, **kw)),
    OptimizerCase("SAMPa", fastsam.SAMPa,
                  lambda ps, base, **kw: fastsam.SAMPa(ps, torch.optim.SGD, rho=0.1, lam=0.2, parallel=False,
                                                       **_one_pass_kwargs(kw, "lr", "momentum", "perturb_eps")),
                  drive="closure_only"),
    OptimizerCase("BSAM", fastsam.BSAM,
                  lambda ps, base, **kw: fastsam.BSAM(ps, num_data=64, rho=0.05, seed=0,
                                                      **_one_pass_kwargs(kw, "perturb_eps")),
                  drive="closure_only"),
    OptimizerCase("LookSAM", fastsam.LookSAM, lambda ps, base, **kw: fastsam.LookSAM(ps, base, rho=0.05, k=2, alpha=0.5,
                                                                                     **kw),
                  fused_ops=("grad_dot", "looksam_orthogonal"), cheap_ops=("grad_norm", "looksam_combine")),
]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def per_sample_closure(model, x, y):
    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
    return closure


def first_half(case: OptimizerCase, model, opt, x, y) -> None:
    """Gradient at w, ``first_step``, gradient at ``w + e``: the optimizer is now mid-step (two-call form)."""
    opt.zero_grad(set_to_none=True)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()


def one_step(case: OptimizerCase, model, opt, x, y, form: str = "auto") -> None:
    """One whole step the way a user of this class writes it.

    ``form``: ``"auto"`` (the class's own protocol: per-sample closure, or the two-call form skipping
    the second pass on cheap steps), ``"closure"`` (``opt.step(closure)``, two-call classes only).
    """
    if case.drive == "closure_only":
        def full_closure():
            loss = loss_of(model, x, y)
            loss.backward()
            return loss
        opt.zero_grad(set_to_none=True)
        opt.step(full_closure)
        return
    if case.drive == "one_pass":
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()
        return
    if case.drive == "per_sample" and form == "auto":
        opt.step(per_sample_closure(model, x, y), **case.step_kwargs(len(y)))
        return
    opt.zero_grad(set_to_none=True)
    loss_of(model, x, y).backward()
    if form == "closure":
        def closure():
            loss = loss_of(model, x, y)
            loss.backward()
            return loss
        opt.step(closure)
        return
    if opt.needs_second_pass:
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)


def case_ids() -> list[str]:
    return [c.name for c in CASES]
