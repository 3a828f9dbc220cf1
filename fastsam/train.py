"""``fastsam train``: the built-in main job.

Trains one small convolutional network per optimizer on scikit-learn's bundled 8x8 handwritten
digits (no download), with a fraction of the training labels flipped at random (label noise is where
SAM's flat minima help most), for ``--seeds`` seeds, and prints test accuracy (mean +- std over the
seeds) next to training throughput in images/s and relative to SGD. Within a seed every optimizer
starts from the same initial weights and sees the same batches, and the optimizers are interleaved
epoch by epoch (seed 0: epoch 1 of every optimizer, then epoch 2 of every optimizer, ...; then seed
1), so a machine whose load changes during the run slows every optimizer alike and the throughput
ratios come from one side-by-side run.

Optimizers are looked up by name in ``OPTIMIZERS`` (see ``register``); each entry says how to build
the optimizer and how its training step is driven.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# How an optimizer's step is driven by the training loop:
#   "plain":    loss.backward(); opt.step()                       (SGD, one-pass variants such as Momentum-SAM)
#   "two_call": backward; [first_step; backward at w + e;] second_step, the second pass only when
#               opt.needs_second_pass (SAM and every SAM subclass with the two-call form)
#   "closure":  opt.step(closure) with closure(indices=None) -> per-sample losses (ESAM, MSAM, ...):
#               the optimizer runs its passes itself
#   "loss_closure": opt.step(closure) with closure() -> the loss after its backward (BSAM: its two
#               gradients are at the noisy and the perturbed weights)
DRIVES = ("plain", "two_call", "closure", "loss_closure")


@dataclass(frozen=True)
class TrainSetup:
    """What an optimizer builder may use: the run's learning rate, backend, model and length."""

    lr: float
    backend: str
    model: nn.Module
    epochs: int
    steps_per_epoch: int
    seed: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_data: int = 0  # training-set size (BSAM's posterior scale); 0 when unknown

    @property
    def sgd(self) -> dict:
        """The base SGD options every SGD-based entry shares (so only the SAM part differs)."""
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable  # build(params, setup: TrainSetup) -> optimizer
    drive: str = "two_call"
    batch_multiple: int = 1  # the batch is trimmed to a multiple of this (MSAM's micro-batches)
    step_kwargs: Callable | None = None  # step_kwargs(batch_size) -> extra keyword arguments of opt.step
    summary: str = ""


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(name: str, build: Callable, drive: str = "two_call", *, batch_multiple: int = 1,
             step_kwargs: Callable | None = None, summary: str = "") -> None:
    """Add an optimizer to ``fastsam train --optimizers``: one call per optimizer, e.g.

        register("sam", lambda params, s: fastsam.SAM(params, torch.optim.SGD, rho=0.05, backend=s.backend, **s.sgd))

    ``build(params, setup)`` gets the model's parameters and a :class:`TrainSetup`; ``drive`` is one
    of ``DRIVES``. Use the paper's default hyper-parameters (scaled to this task only where the paper
    says how) so that rows compare the algorithms, not their tuning.
    """
    if drive not in DRIVES:
        raise ValueError(f"drive must be one of {DRIVES}, got {drive!r}")
    if name in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is already registered")
    OPTIMIZERS[name.lower()] = OptimizerEntry(build, drive, batch_multiple, step_kwargs, summary)


def _fastsam():
    import fastsam

    return fastsam


MSAM_MICRO_BATCHES = 4

register("sgd", lambda p, s: torch.optim.SGD(p, **s.sgd), "plain", summary="SGD with momentum 0.9, wd 5e-4")
register("sam", lambda p, s: _fastsam().SAM(p, torch.optim.SGD, rho=0.05, backend=s.backend, **s.sgd),
         summary="SAM rho=0.05")
register("asam", lambda p, s: _fastsam().ASAM(p, torch.optim.SGD, rho=0.5, eta=0.01, backend=s.backend, **s.sgd),
         summary="ASAM rho=0.5 eta=0.01")
register("fishersam", lambda p, s: _fastsam().FisherSAM(p, torch.optim.SGD, rho=0.1, eta=1.0, backend=s.backend,
                                                        **s.sgd), summary="Fisher SAM rho=0.1 eta=1")
register("esam", lambda p, s: _fastsam().ESAM(p, torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, model=s.model,
                                              backend=s.backend, **s.sgd), "closure",
         summary="ESAM rho=0.05 beta=0.5 gamma=0.5")
register("msam", lambda p, s: _fastsam().MSAM(p, torch.optim.SGD, rho=0.05, micro_batches=MSAM_MICRO_BATCHES,
                                              model=s.model, backend=s.backend, **s.sgd), "closure",
         batch_multiple=MSAM_MICRO_BATCHES, step_kwargs=lambda b: {"batch_size": b},
         summary="mSAM rho=0.05, 4 micro-batches")
register("gsam", lambda p, s: _fastsam().GSAM(p, torch.optim.SGD, rho=0.05, alpha=0.4, backend=s.backend, **s.sgd),
         summary="GSAM rho=0.05 alpha=0.4")
register("looksam", lambda p, s: _fastsam().LookSAM(p, torch.optim.SGD, rho=0.05, k=5, alpha=0.7, backend=s.backend,
                                                    **s.sgd), summary="LookSAM rho=0.05 k=5 alpha=0.7")
register("intervalsam", lambda p, s: _fastsam().SAM(p, torch.optim.SGD, rho=0.05, every=5, backend=s.backend,
                                                    **s.sgd), summary="SAM rho=0.05 every 5th step")
register("momentumsam", lambda p, s: _fastsam().MomentumSAM(p, rho=0.3, backend=s.backend, **s.sgd), "plain",
         summary="Momentum-SAM rho=0.3 (authors' default)")
register("aesam", lambda p, s: _fastsam().AESAM(p, torch.optim.SGD, rho=0.05, total_steps=s.epochs * s.steps_per_epoch,
                                                backend=s.backend, **s.sgd),
         summary="AE-SAM rho=0.05 delta=0.9 lambda -1 -> 1 (paper's CIFAR defaults)")
register("rst", lambda p, s: _fastsam().RandomSwitchSAM(p, torch.optim.SGD, rho=0.05, probability=0.5, seed=s.seed,
                                                        backend=s.backend, **s.sgd),
         summary="RST rho=0.05, SAM with probability 0.5")
register("ksam", lambda p, s: _fastsam().KSAM(p, torch.optim.SGD, rho=0.05, gamma=0.5, model=s.model, backend=s.backend,
                                              **s.sgd), "closure", summary="K-SAM rho=0.05, top half of the batch")
register("sampa", lambda p, s: _fastsam().SAMPa(p, torch.optim.SGD, rho=0.1, lam=0.2, parallel=False, backend=s.backend,
                                               **s.sgd), "loss_closure",
         summary="SAMPa-0.2 rho=0.1 (authors' defaults), both gradients in this one process (SAM's cost)")
register("wsam", lambda p, s: _fastsam().WSAM(p, torch.optim.SGD, rho=0.05, gamma=0.9, backend=s.backend, **s.sgd),
         summary="WSAM rho=0.05 gamma=0.9, decoupled")
register("friendlysam", lambda p, s: _fastsam().FriendlySAM(p, torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9,
                                                            backend=s.backend, **s.sgd),
         summary="FriendlySAM rho=0.05 sigma=1 lmbda=0.9")
register("bsam", lambda p, s: _fastsam().BSAM(p, max(1, s.num_data), lr=0.5, rho=0.05, weight_decay=s.weight_decay,
                                              damping=0.1, seed=s.seed, backend=s.backend), "loss_closure",
         summary="bSAM (authors' algorithm) lr=0.5 rho=0.05 damping=0.1")
# layer-wise perturbation (AWP / WT-AWP), HERO and δ-SAM
register("awp", lambda p, s: _fastsam().AWP(p, torch.optim.SGD, rho=5e-3, backend=s.backend, **s.sgd),
         summary="AWP rho=5e-3 (relative to each layer's norm; the authors' gamma)")
register("wtawp", lambda p, s: (lambda ps: _fastsam().AWP(ps, torch.optim.SGD, rho=5e-3, lmbda=0.5, truncate=ps[-2:],
                                                           backend=s.backend, **s.sgd))(list(p)),
         summary="WT-AWP rho=5e-3 lmbda=0.5, output layer truncated")
register("hero", lambda p, s: _fastsam().HERO(p, torch.optim.SGD, rho=0.5, lmbda=5.0, backend=s.backend, **s.sgd),
         "closure", summary="HERO rho=0.5 lmbda=5, adaptive (the authors' CIFAR-10 command)")
register("deltasam", lambda p, s: _fastsam().DeltaSAM(p, torch.optim.SGD, rho=0.05, temperature=1.0, model=s.model,
                                                      backend=s.backend, **s.sgd), "closure",
         summary="δ-SAM rho=0.05 temperature=1")


def load_digits_tensors(noise: float, seed: int, device: torch.device):
    """(x_train, y_train_noisy, x_test, y_test) from sklearn's digits, 1297 train / 500 test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise SystemExit("fastsam train needs scikit-learn for its bundled digits data: "
                         "pip install 'fastsam[train]' (or scikit-learn)") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    x, y = x[perm], y[perm]
    x = (x - x[:1297].mean()) / x[:1297].std()
    x_train, y_train, x_test, y_test = x[:1297], y[:1297].clone(), x[1297:], y[1297:]
    flip = torch.rand(len(y_train), generator=gen) < noise
    # A flipped label is drawn uniformly from the other nine classes.
    y_train[flip] = (y_train[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=gen)) % 10
    return (t.to(device) for t in (x_train, y_train, x_test, y_test))


class DigitsNet(nn.Module):
    """Two 3x3 conv blocks with BatchNorm, global pooling, a linear head (about 24k parameters)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_optimizer(name: str, params, lr: float, backend: str, model=None, *, epochs: int = 1,
                   steps_per_epoch: int = 1, seed: int = 0, num_data: int = 0):
    """The registered optimizer ``name`` over ``params`` (see ``register``)."""
    entry = OPTIMIZERS.get(name)
    if entry is None:
        raise ValueError(f"unknown optimizer {name!r}; choose from {','.join(OPTIMIZERS)}")
    return entry.build(params, TrainSetup(lr, backend, model, epochs, steps_per_epoch, seed, num_data=num_data))


@dataclass
class RunResult:
    optimizer: str
    seed: int
    test_accuracy: float
    best_test_accuracy: float
    seconds_per_epoch: float  # median over epochs, training only (evaluation excluded)
    images_per_epoch: int


@dataclass
class Summary:
    optimizer: str
    runs: list

    @staticmethod
    def _mean_std(values) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    @property
    def accuracy(self) -> tuple[float, float]:
        return self._mean_std([r.test_accuracy for r in self.runs])

    @property
    def best_accuracy(self) -> tuple[float, float]:
        return self._mean_std([r.best_test_accuracy for r in self.runs])

    @property
    def images_per_second(self) -> float:
        """Training images per second from the median epoch time over every epoch of every seed."""
        return self.runs[0].images_per_epoch / statistics.median(r.seconds_per_epoch for r in self.runs)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


class _Run:
    """One optimizer on one seed, advanced an epoch at a time (so runs can be interleaved epoch by epoch)."""

    def __init__(self, name, data, init_state, args, seed: int):
        self.name, self.entry, self.data, self.args, self.seed = name, OPTIMIZERS[name], data, args, seed
        x_train, y_train = data[0], data[1]
        self.model = DigitsNet().to(x_train.device)
        self.model.load_state_dict(init_state)
        steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
        self.opt = make_optimizer(name, self.model.parameters(), args.lr, args.backend, model=self.model,
                                  epochs=args.epochs, steps_per_epoch=steps_per_epoch, seed=seed,
                                  num_data=len(y_train))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=args.epochs)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.best, self.acc, self.epoch_times, self.images = 0.0, 0.0, [], 0

    def epoch(self) -> float:
        import fastsam

        model, opt, entry, args = self.model, self.opt, self.entry, self.args
        x_train, y_train, x_test, y_test = self.data
        t0 = time.perf_counter()
        perm = torch.randperm(len(y_train), generator=self.gen).to(x_train.device)
        images = 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            if entry.batch_multiple > 1:  # e.g. MSAM's shards split the batch evenly: drop the remainder
                idx = idx[:len(idx) // entry.batch_multiple * entry.batch_multiple]
                if len(idx) == 0:
                    continue
            images += len(idx)
            xb, yb = x_train[idx], y_train[idx]
            if entry.drive == "closure":
                def closure(indices=None, xb=xb, yb=yb):
                    xs, ys = (xb, yb) if indices is None else (xb[indices], yb[indices])
                    return F.cross_entropy(model(xs), ys, reduction="none")

                opt.step(closure, **(entry.step_kwargs(len(yb)) if entry.step_kwargs else {}))
                continue
            if entry.drive == "loss_closure":
                def loss_closure(xb=xb, yb=yb):
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                opt.step(loss_closure)
                opt.zero_grad(set_to_none=True)
                continue
            F.cross_entropy(model(xb), yb).backward()
            if entry.drive == "plain":
                opt.step()
                opt.zero_grad(set_to_none=True)
                continue
            if opt.needs_second_pass:  # False on the cheap steps of LookSAM, interval SAM, AE-SAM, RST
                opt.first_step(zero_grad=True)
                with fastsam.frozen_running_stats(model):
                    F.cross_entropy(model(xb), yb).backward()
            opt.second_step(zero_grad=True)
        self.sched.step()
        self.epoch_times.append(time.perf_counter() - t0)
        self.images = images
        eval_weights = getattr(opt, "unperturbed", None)  # Momentum-SAM keeps w - s v between steps
        if eval_weights is not None:
            with eval_weights():
                self.acc = accuracy(model, x_test, y_test)
        else:
            self.acc = accuracy(model, x_test, y_test)
        self.best = max(self.best, self.acc)
        return self.acc

    def result(self) -> RunResult:
        # Median epoch time: robust to the first epoch's one-off costs (allocator, kernel selection).
        return RunResult(self.name, self.seed, self.acc, self.best, statistics.median(self.epoch_times), self.images)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the description's paragraphs."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    if parser is None:
        parser = argparse.ArgumentParser(prog="fastsam train", description=__doc__)
    parser.formatter_class = _HelpFormatter
    p = parser
    p.add_argument("--optimizers", default="sgd,sam,asam",
                   help=f"comma-separated names, from: {','.join(OPTIMIZERS)}; or 'all'")
    p.add_argument("--seeds", type=int, default=3,
                   help="number of seeds (data split, label noise, initial weights and batch order); "
                        "accuracy is reported as mean +- std over them")
    p.add_argument("--seed", type=int, default=0, help="the first seed; the run uses seed, seed+1, ...")
    p.add_argument("--epochs", type=int, default=30, help="epochs per optimizer and seed")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine schedule)")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--backend", default="auto", help="fastsam backend: auto, torch, triton or cuda")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="keep each trained model in DIR (one file per optimizer and seed) for fastsam sharpness DIR")
    return p


def _names(spec: str) -> list[str]:
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return list(OPTIMIZERS)
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
        raise SystemExit(f"unknown optimizer(s) {bad}; choose from {','.join(OPTIMIZERS)}")
    if not names:
        raise SystemExit("--optimizers names no optimizer")
    return names


def run(args) -> list[Summary]:
    from tqdm.auto import tqdm

    names = _names(args.optimizers)
    if not 0 <= args.noise < 1:
        raise SystemExit("--noise must be in [0, 1)")
    if args.epochs < 1 or args.batch_size < 1 or args.seeds < 1:
        raise SystemExit("--epochs, --batch-size and --seeds must be >= 1")
    device = torch.device(args.device)
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"fastsam train: digits (1297 train with {args.noise:.0%} label noise, 500 test), "
          f"{args.epochs} epochs, batch {args.batch_size}, {len(seeds)} seed(s), device {device}, "
          f"{torch.get_num_threads()} thread(s); optimizers interleaved epoch by epoch")
    runs: dict[str, list] = {n: [] for n in names}
    t_start = time.perf_counter()
    with tqdm(total=len(seeds) * len(names) * args.epochs, unit="epoch", dynamic_ncols=True) as progress:
        for seed in seeds:
            torch.manual_seed(seed)
            data = tuple(load_digits_tensors(args.noise, seed, device))
            init_state = DigitsNet().state_dict()
            seed_runs = [_Run(name, data, init_state, args, seed) for name in names]
            for epoch in range(args.epochs):  # round robin, an epoch each: load changes hit every optimizer
                for r in seed_runs:
                    acc = r.epoch()
                    progress.set_postfix_str(f"seed {seed} {r.name} epoch {epoch + 1}/{args.epochs} test acc {acc:.3f}")
                    progress.update(1)
            for r in seed_runs:
                runs[r.name].append(r.result())
                if args.save:
                    _save(r, args)
    elapsed = time.perf_counter() - t_start
    summaries = [Summary(n, runs[n]) for n in names]
    base = next((s.images_per_second for s in summaries if s.optimizer == "sgd"), None)
    print(f"{'optimizer':<12} {'test acc (mean ± std)':>21} {'best acc':>8} {'images/s':>9} {'vs sgd':>7}")
    for s in summaries:
        (acc, std), (best, _) = s.accuracy, s.best_accuracy
        ratio = f"{s.images_per_second / base:6.2f}x" if base else "      -"
        print(f"{s.optimizer:<12} {acc:>13.3f} ± {std:.3f} {best:>8.3f} {s.images_per_second:>9.0f} {ratio:>7}")
    print(f"total {elapsed:.0f} s ({elapsed / 60:.1f} min); images/s from the median training time per epoch over "
          f"every epoch and seed; 'vs sgd' is the throughput ratio (higher is faster)")
    return summaries


def _save(r: _Run, args) -> None:
    """``--save DIR``: the trained model (its evaluation weights, where the optimizer has them) and its settings."""
    import contextlib
    import os

    from fastsam.sharpness.cli import save_model

    os.makedirs(args.save, exist_ok=True)
    eval_weights = getattr(r.opt, "unperturbed", None)  # Momentum-SAM: w, not the ascent point
    with eval_weights() if eval_weights is not None else contextlib.nullcontext():
        save_model(os.path.join(args.save, f"{r.name}-seed{r.seed}.pt"), optimizer=r.name, seed=r.seed,
                   noise=args.noise, model=r.model, test_accuracy=r.acc, epochs=args.epochs)


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0
