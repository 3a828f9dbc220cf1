"""SWA with SAM: stochastic weight averaging (Izmailov et al., UAI 2018) over a fastsam.SAM run, as
used to fine-tune language models with SAM and SWA (Kaddour et al., "When Do Flat Minima Optimizers
Work?", NeurIPS 2022).

torch.optim.swa_utils does all of it, on fastsam's optimizer as it is:

* ``AveragedModel(model)`` keeps the running average of the weights; ``update_parameters`` after
  each SAM step of the averaging phase (the weights are restored by then, never perturbed);
* ``SWALR(optimizer, swa_lr=...)`` anneals the learning rate in fastsam's param groups, which are
  the base optimizer's, so the base step sees it;
* ``update_bn(loader, swa_model)`` recomputes the BatchNorm statistics of the averaged weights.

    python examples/sam_swa.py --steps 300
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

import fastsam


def make_data(n=2048, dim=20, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 0.7
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, dim, generator=gen), y


def make_model(dim=20, classes=4):
    return nn.Sequential(nn.Linear(dim, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))


def sam_step(model, optimizer, xb, yb):
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    with fastsam.frozen_running_stats(model):
        F.cross_entropy(model(xb), yb).backward()
    optimizer.second_step(zero_grad=True)
    return loss.detach()


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(steps, swa_start, batch_size=64, rho=0.05, swa_lr=0.02, on_average=None):
    """SAM for ``steps`` steps, averaging from ``swa_start`` on; returns (model, swa_model, optimizer)."""
    torch.manual_seed(0)
    x, y = make_data()
    model = make_model()
    optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=swa_start)
    swa_model = AveragedModel(model)
    swa_scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=5)
    for step in range(steps):
        i = torch.randint(0, len(y), (batch_size,))
        sam_step(model, optimizer, x[i], y[i])
        if step >= swa_start:
            swa_model.update_parameters(model)
            swa_scheduler.step()
            if on_average is not None:
                on_average(model, optimizer)
        else:
            scheduler.step()
    loader = [(x[i:i + 256],) for i in range(0, len(y), 256)]
    update_bn(loader, swa_model)
    return model, swa_model, optimizer, (x, y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--swa-start", type=int, default=None, help="first averaged step (default: 3/4 of --steps)")
    args = ap.parse_args(argv)
    swa_start = args.swa_start if args.swa_start is not None else args.steps * 3 // 4
    model, swa_model, _, (x, y) = train(args.steps, swa_start)
    print(f"SAM accuracy {accuracy(model, x, y):.3f}")
    print(f"SWA accuracy {accuracy(swa_model, x, y):.3f} over {int(swa_model.n_averaged)} averaged steps")


if __name__ == "__main__":
    main()
