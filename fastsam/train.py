"""``fastsam train``: the built-in main job.

Trains one small convolutional network per optimizer (plain SGD, SAM, ASAM by default) on
scikit-learn's bundled 8x8 handwritten digits (no download), with a fraction of the training labels
flipped at random (label noise is where SAM's flat minima help most), and prints test accuracy and
time per epoch for each. Every optimizer starts from the same initial weights and sees the same
batches, so the comparison is side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

OPTIMIZERS = ("sgd", "sam", "asam", "fishersam", "esam", "msam", "gsam", "looksam")
# Optimizers that run their own passes from a per-sample-loss closure (fastsam.ESAM, fastsam.MSAM).
CLOSURE_DRIVEN = ("esam", "msam")
MSAM_MICRO_BATCHES = 4


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


def make_optimizer(name: str, params, lr: float, backend: str, model=None):
    import fastsam

    common = dict(lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "sgd":
        return torch.optim.SGD(params, **common)
    if name == "sam":
        return fastsam.SAM(params, torch.optim.SGD, rho=0.05, backend=backend, **common)
    if name == "asam":
        return fastsam.ASAM(params, torch.optim.SGD, rho=0.5, eta=0.01, backend=backend, **common)
    if name == "fishersam":
        return fastsam.FisherSAM(params, torch.optim.SGD, rho=0.1, eta=1.0, backend=backend, **common)
    if name == "esam":
        return fastsam.ESAM(params, torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, model=model, backend=backend,
                            **common)
    if name == "msam":
        return fastsam.MSAM(params, torch.optim.SGD, rho=0.05, micro_batches=MSAM_MICRO_BATCHES, model=model,
                            backend=backend, **common)
    if name == "gsam":
        return fastsam.GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.4, backend=backend, **common)
    if name == "looksam":
        return fastsam.LookSAM(params, torch.optim.SGD, rho=0.05, k=5, alpha=0.7, backend=backend, **common)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@dataclass
class RunResult:
    optimizer: str
    test_accuracy: float
    best_test_accuracy: float
    seconds_per_epoch: float


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_one(name, data, init_state, args, progress) -> RunResult:
    import fastsam

    x_train, y_train, x_test, y_test = data
    model = DigitsNet().to(x_train.device)
    model.load_state_dict(init_state)
    opt = make_optimizer(name, model.parameters(), args.lr, args.backend, model=model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator().manual_seed(args.seed + 1)
    best, epoch_times = 0.0, []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y_train), generator=gen).to(x_train.device)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            if name == "msam":  # the shards must split the batch evenly: drop the last batch's remainder
                idx = idx[:len(idx) // MSAM_MICRO_BATCHES * MSAM_MICRO_BATCHES]
                if len(idx) == 0:
                    continue
            xb, yb = x_train[idx], y_train[idx]
            if name in CLOSURE_DRIVEN:
                def closure(indices=None, xb=xb, yb=yb):
                    xs, ys = (xb, yb) if indices is None else (xb[indices], yb[indices])
                    return F.cross_entropy(model(xs), ys, reduction="none")

                opt.step(closure, **({"batch_size": len(yb)} if name == "msam" else {}))
                continue
            F.cross_entropy(model(xb), yb).backward()
            if name == "sgd":
                opt.step()
                opt.zero_grad()
                continue
            if opt.needs_second_pass:  # always, except LookSAM's steps between its SAM steps
                opt.first_step(zero_grad=True)
                with fastsam.frozen_running_stats(model):
                    F.cross_entropy(model(xb), yb).backward()
            opt.second_step(zero_grad=True)
        sched.step()
        epoch_times.append(time.perf_counter() - t0)
        acc = accuracy(model, x_test, y_test)
        best = max(best, acc)
        progress.set_postfix_str(f"{name} epoch {epoch + 1}/{args.epochs} test acc {acc:.3f}")
        progress.update(1)
    # Median epoch time: robust to the first epoch's one-off costs (allocator, kernel selection).
    return RunResult(name, acc, best, statistics.median(epoch_times))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fastsam train", description=__doc__)
    p.add_argument("--optimizers", default="sgd,sam,asam",
                   help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: sgd,sam,asam)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="fastsam backend: auto, torch, triton or cuda")
    return p


def run(args) -> list[RunResult]:
    from tqdm.auto import tqdm

    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
        raise SystemExit(f"unknown optimizer(s) {bad}; choose from {OPTIMIZERS}")
    if not 0 <= args.noise < 1:
        raise SystemExit("--noise must be in [0, 1)")
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data = tuple(load_digits_tensors(args.noise, args.seed, device))
    init_state = DigitsNet().state_dict()
    print(f"fastsam train: digits (1297 train with {args.noise:.0%} label noise, 500 test), "
          f"{args.epochs} epochs, batch {args.batch_size}, device {device}")
    results = []
    with tqdm(total=len(names) * args.epochs, unit="epoch", dynamic_ncols=True) as progress:
        for name in names:
            results.append(train_one(name, data, init_state, args, progress))
    print(f"{'optimizer':<10} {'test acc':>9} {'best acc':>9} {'s/epoch':>9} {'vs sgd':>7}")
    base = next((r.seconds_per_epoch for r in results if r.optimizer == "sgd"), None)
    for r in results:
        ratio = f"{r.seconds_per_epoch / base:6.2f}x" if base else "      -"
        print(f"{r.optimizer:<10} {r.test_accuracy:>9.3f} {r.best_test_accuracy:>9.3f} "
              f"{r.seconds_per_epoch:>9.3f} {ratio:>7}")
    return results


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0
