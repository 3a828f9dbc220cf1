"""Who is benchmarked, discovered at run time.

=========================  ========================================================================
provider                   what it is
=========================  ========================================================================
``fastsam-<backend>``      fastsam on each backend that can run the op here (``cuda``, ``triton``,
                           ``torch``). Triton under ``TRITON_INTERPRET=1`` runs CPU tensors for the
                           tests only; it is never timed.
``fastsam-torch+compile``  fastsam's torch backend (the op functions, backend ``"torch"``) under
                           ``torch.compile``; skipped with the compiler's reason when it cannot trace
``foreach+compile``        the same arithmetic in plain ``torch._foreach_*`` code under
                           ``torch.compile`` (``bench/baselines.py``): what inductor makes of it
``baseline-per-param``     the classic per-parameter SAM loop (``bench/baselines.py``)
``peer-foreach-off/on``    pytorch-optimizer's ``SAM`` (an optional dependency) with ``foreach``
                           off and on (the flag also reaches its base optimizer)
=========================  ========================================================================

[note: torch.compile in the benchmarks]
Inductor's compile time grows with the number of tensors in a list op: on a 2-core CPU a first step
over 62 tensors compiles in about 10 s, over 2000 tensors in about 9 minutes. Compiled providers are
therefore opt-in (``fastsam bench --compile``; on by default in the full plan) and skipped for
parameter sets with more than ``COMPILE_MAX_TENSORS`` (100) tensors, so the full GPU plan stays
within minutes (resnet18 and huge are compiled, small2000 and vit_b are not). A compiled provider
is primed once (its compile time is recorded as the ``compile_s`` metric), then timed like any other.
"""

from __future__ import annotations

from typing import Callable

import torch

from .baselines import PerParameterSAM

RHO = 0.05
SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
ADAMW_KW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW)}
COMPILE_MAX_TENSORS = 100

# fastsam ops each optimizer-level subject needs from a backend.
FIRST_STEP_OPS = ("grad_norm", "perturb")
SECOND_STEP_OPS = {"sgd": ("restore_sgd_step",), "adamw": ("restore_adamw_step",)}


class Skip(Exception):
    """A provider cannot run here; the message says why (printed, no rows written)."""


def fastsam_backends(op_names: tuple[str, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """fastsam backends that can run every op in ``op_names`` on ``device`` and are worth timing."""
    from fastsam import ops

    out = []
    for backend in ops.BACKENDS:
        if not all(ops.supports(backend, op, device, dtype)[0] for op in op_names):
            continue
        if backend != "torch" and device.type != "cuda":
            continue  # the Triton interpreter on CPU tensors: a correctness tool, not a speed
        out.append(backend)
    return out


def peer_sam() -> tuple[type | None, str]:
    """pytorch-optimizer's SAM class, or None and a message saying how to get it."""
    try:
        from pytorch_optimizer import SAM
    except ImportError:
        return None, "pytorch-optimizer is not installed: peer providers skipped (pip install pytorch-optimizer)"
    return SAM, ""


def compile_fn(fn: Callable, n_tensors: int) -> Callable:
    """``torch.compile(fn)``, or :class:`Skip` when the list is too long to compile in reasonable time."""
    if n_tensors > COMPILE_MAX_TENSORS:
        raise Skip(f"{n_tensors} tensors: compile would take minutes (limit {COMPILE_MAX_TENSORS}, "
                   "see providers.py)")
    return torch.compile(fn)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_tensors(shapes, device: torch.device, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = _generator(device, seed)
    return [torch.randn(s, generator=gen, device=device).mul_(scale) for s in shapes]


def make_params(shapes, device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    """Parameters with ``.grad`` set (gradients 1e-3 the weights' scale, like a trained network's)."""
    params = [torch.nn.Parameter(t) for t in make_tensors(shapes, device, seed)]
    for p, g in zip(params, make_tensors(shapes, device, seed + 1, 1e-3)):
        p.grad = g
    return params


def optimizer_factories(base: str, device: torch.device, op_names: tuple[str, ...]) -> tuple[dict, list[str]]:
    """name -> ``make(params) -> optimizer`` for fastsam's backends, the baseline and the peer."""
    import fastsam

    base_cls, kw = BASES[base]
    out: dict[str, Callable] = {}
    for backend in fastsam_backends(op_names, device):
        out[f"fastsam-{backend}"] = lambda ps, b=backend: fastsam.SAM(ps, base_cls, rho=RHO, backend=b, **kw)
    out["baseline-per-param"] = lambda ps: PerParameterSAM(ps, base_cls, rho=RHO, **kw)
    notes = []
    peer, why = peer_sam()
    if peer is None:
        notes.append(why)
    else:
        for flag in (False, True):
            out[f"peer-foreach-{'on' if flag else 'off'}"] = (
                lambda ps, f=flag: peer(ps, base_cls, rho=RHO, foreach=f, **kw))
    return out, notes


@torch.no_grad()
def undo_first_step(opt) -> None:
    """Put the weights back after ``first_step`` without a base step, whichever provider ``opt`` is."""
    if hasattr(opt, "restore"):  # fastsam and the baseline
        opt.restore()
        return
    for group in opt.param_groups:  # pytorch-optimizer keeps the copy as state["old_p"]
        for p in group["params"]:
            saved = opt.state[p].pop("old_p", None)
            if saved is not None:
                p.copy_(saved)
