"""End-to-end training throughput on synthetic data: SGD vs the SAM family, measured in one run.

Models (``bench/models.py``): a CIFAR-style ResNet-18 and a small ViT, both on 32x32 images of 10
classes. Every optimizer trains its own copy of the same initial model on the same random batches;
the rows give images per second and the ratio to plain SGD (on CPU from interleaved rounds, so the
ratio is paired per round). The optimizers, all with an SGD base (lr 0.1, momentum 0.9, weight
decay 5e-4) and ``rho = 0.05``:

=============  ==================================================================================
``sgd``        ``torch.optim.SGD``: one forward/backward per step
``sam``        ``fastsam.SAM``, two-call form, BatchNorm statistics frozen in the second pass
``esam``       ``fastsam.ESAM(beta=0.5, gamma=0.5, swp="element", model=model)``, per-sample-loss
               closure (the optimizer runs the passes)
``msam``       ``fastsam.MSAM(micro_batches=4, model=model)``, ``step(closure, batch_size=B)``
``looksam``    ``fastsam.LookSAM(k=5, alpha=0.7)``, SAM-style closure (called every 5th step)
``gsam``       ``fastsam.GSAM(alpha=0.4)``, two-call form
``sam-baseline`` / ``sam-peer``  the per-parameter loop / pytorch-optimizer's SAM (full plan only)
=============  ==================================================================================

Optimizers that this fastsam does not have are left out with a note (found with
``hasattr(fastsam, name)``). One timed sample is ``STEPS_PER_SAMPLE`` = 5 consecutive training steps,
a whole LookSAM cycle (one SAM step, four cheap ones), so that medians do not pick its cheap steps.
Reference point, the ESAM paper (Du et al., ICLR 2022, CIFAR-10 ResNet-18 on a V100): SGD 3387,
SAM 1717, ESAM 2409 images/s, i.e. SAM 0.51x, ESAM 0.71x.

The full plan uses the real sizes (batch 128; ResNet-18 width 64; ViT dim 192, depth 6). The CPU
default runs the same code at a reduced size; every row names its settings in the ``size`` field.

Run: ``python -m fastsam.bench.bench_e2e --plan quick``.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import harness, providers
from .baselines import PerParameterSAM
from .harness import Instance
from .models import CifarResNet18, SmallViT, count_parameters

SGD_KW = providers.SGD_KW
RHO = providers.RHO
STEPS_PER_SAMPLE = 5  # LookSAM's k: every sample covers one whole cycle
ESAM_PAPER = {"sgd": 3387.0, "sam": 1717.0, "esam": 2409.0}


@dataclass(frozen=True)
class Setting:
    """One model at one size; ``arch`` holds the constructor's keyword arguments."""

    model: str
    batch: int
    image: int = 32
    arch: dict = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        if self.model == "resnet18":
            return CifarResNet18(**self.arch)
        if self.model == "vit":
            return SmallViT(image=self.image, **self.arch)
        raise ValueError(f"unknown model {self.model!r}")

    def label(self, params: int) -> str:
        arch = ",".join(f"{k}={v}" for k, v in self.arch.items())
        return f"batch={self.batch},image={self.image}" + (f",{arch}" if arch else "") + f",params={params}"


PLANS = {
    "full": [Setting("resnet18", 128, 32, dict(width=64)),
             Setting("vit", 128, 32, dict(patch=4, dim=192, depth=6, heads=3, mlp=768))],
    "quick": [Setting("resnet18", 32, 32, dict(width=8)),
              Setting("vit", 32, 32, dict(patch=4, dim=64, depth=2, heads=2, mlp=128))],
    "tiny": [Setting("resnet18", 8, 16, dict(width=4)),
             Setting("vit", 8, 16, dict(patch=4, dim=32, depth=1, heads=2, mlp=64))],
}


def _loss(model, x, y, reduction="mean"):
    return F.cross_entropy(model(x), y, reduction=reduction)


def _sgd_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()
    opt.step()


def _two_pass_step(model, opt, x, y):
    """SAM's two-call form (fastsam.SAM, the baseline and the peer share it)."""
    import fastsam

    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with fastsam.frozen_running_stats(model):
        _loss(model, x, y).backward()
    opt.second_step(zero_grad=True)


def _per_sample_closure(model, x, y):
    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return _loss(model, xb, yb, reduction="none")
    return closure


def _per_sample_step(model, opt, x, y):
    """ESAM: the optimizer drives the passes through a per-sample-loss closure."""
    opt.zero_grad(set_to_none=True)
    opt.step(_per_sample_closure(model, x, y))


def _micro_batch_step(model, opt, x, y):
    """mSAM: like ESAM, and it needs the batch size to cut the batch into shards."""
    opt.zero_grad(set_to_none=True)
    opt.step(_per_sample_closure(model, x, y), batch_size=len(y))


def _closure_step(model, opt, x, y):
    """LookSAM: gradient at w first, then ``step(closure)``; the closure is SAM's second pass."""
    import fastsam

    def closure():
        with fastsam.frozen_running_stats(model):
            loss = _loss(model, x, y)
            loss.backward()
        return loss

    _loss(model, x, y).backward()
    opt.step(closure)
    opt.zero_grad(set_to_none=True)


def optimizers(full: bool) -> tuple[dict, list[str]]:
    """name -> (make(model) -> optimizer, step(model, opt, x, y)), plus notes on what is missing."""
    import fastsam

    sgd = torch.optim.SGD
    out = {
        "sgd": (lambda m: sgd(m.parameters(), **SGD_KW), _sgd_step),
        "sam": (lambda m: fastsam.SAM(m.parameters(), sgd, rho=RHO, **SGD_KW), _two_pass_step),
    }
    notes = []
    variants = {
        "esam": ("ESAM", lambda m: fastsam.ESAM(m.parameters(), sgd, rho=RHO, beta=0.5, gamma=0.5, swp="element",
                                                model=m, **SGD_KW), _per_sample_step),
        "msam": ("MSAM", lambda m: fastsam.MSAM(m.parameters(), sgd, rho=RHO, micro_batches=4, model=m, **SGD_KW),
                 _micro_batch_step),
        "looksam": ("LookSAM", lambda m: fastsam.LookSAM(m.parameters(), sgd, rho=RHO, k=5, alpha=0.7, **SGD_KW),
                    _closure_step),
        "gsam": ("GSAM", lambda m: fastsam.GSAM(m.parameters(), sgd, rho=RHO, alpha=0.4, **SGD_KW), _two_pass_step),
    }
    for name, (cls, make, step) in variants.items():
        if hasattr(fastsam, cls):
            out[name] = (make, step)
        else:
            notes.append(f"fastsam.{cls} does not exist in this version: {name} left out of the end-to-end run")
    if full:
        out["sam-baseline"] = (lambda m: PerParameterSAM(m.parameters(), sgd, rho=RHO, **SGD_KW), _two_pass_step)
        peer, why = providers.peer_sam()
        if peer is None:
            notes.append(why)
        else:
            out["sam-peer"] = (lambda m: peer(m.parameters(), sgd, rho=RHO, **SGD_KW), _two_pass_step)
    return out, notes


def measure(setting: Setting, device: torch.device, *, full: bool = False, steps: int = 8, min_steps: int = 3,
            budget_s: float | None = None) -> tuple[list[dict], list[str]]:
    """Images/s and the ratio to SGD of every optimizer on one model setting (``median_ms`` is per
    sample of ``STEPS_PER_SAMPLE`` steps; ``steps`` is the number of samples at most)."""
    torch.manual_seed(0)
    template = setting.build().to(device)
    params = count_parameters(template)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [(torch.randn(setting.batch, 3, setting.image, setting.image, generator=gen, device=device),
                torch.randint(0, 10, (setting.batch,), generator=gen, device=device)) for _ in range(2)]
    opts, notes = optimizers(full)
    builders = {}
    for name, (make_opt, step) in opts.items():
        def make(make_opt=make_opt, step=step):
            model = copy.deepcopy(template).train()
            opt = make_opt(model)
            turn = [0]

            def train_steps():
                for _ in range(STEPS_PER_SAMPLE):
                    x, y = batches[turn[0] % len(batches)]
                    turn[0] += 1
                    step(model, opt, x, y)
            return Instance(train_steps)
        builders[name] = make
    op = f"e2e_{setting.model}"
    size = setting.label(params)
    # No extra warm-up: priming already ran one sample (five steps) of every optimizer.
    timings, rows, more = harness.time_builders(op, size, builders, device, budget_s=budget_s, rounds=steps,
                                                min_rounds=min_steps, warmup=0, count=False, cuda_rep_ms=2000)
    for name, t in timings.items():
        for metric, value in (("median_ms", t.median_ms), ("p20_ms", t.p20_ms), ("p80_ms", t.p80_ms),
                              ("images_per_s", STEPS_PER_SAMPLE * setting.batch / (t.median_ms * 1e-3))):
            rows.append(dict(op=op, provider=name, size=size, metric=metric, value=harness.fmt(value)))
        if "sgd" in timings:
            rows.append(dict(op=op, provider=name, size=size, metric="ratio_to_sgd",
                             value=harness.fmt(harness.speedup(timings, name, "sgd"))))
    return rows, notes + more


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", choices=sorted(PLANS), default="full" if torch.cuda.is_available() else "quick")
    ap.add_argument("--model", choices=("resnet18", "vit"), action="append")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=8,
                    help=f"timed samples of {STEPS_PER_SAMPLE} steps per optimizer (at most)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per model after which timing stops (CPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    note = harness.configure_threads(device, args.threads)
    if note:
        print(note)
    rows, notes = [], []
    for setting in PLANS[args.plan]:
        if args.model and setting.model not in args.model:
            continue
        r, n = measure(setting, device, full=args.plan == "full", steps=args.steps, budget_s=args.budget)
        rows += r
        notes += n
    print(f"device: {harness.device_name(device)}")
    print(harness.format_table(rows))
    for n in dict.fromkeys(notes):
        print("note:", n)
    path = harness.append_rows([dict(r, device=harness.device_name(device)) for r in rows], args.out)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
