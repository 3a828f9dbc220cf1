"""SDAT: Smooth Domain Adversarial Training (Rangwani et al., "A Closer Look at Smoothness in Domain
Adversarial Training", ICML 2022; code: val-iisc/SDAT) with fastsam.SAM's two-call form.

Domain-adversarial training (DANN) learns features that a domain discriminator cannot tell apart
(source vs target) through a gradient-reversal layer. SDAT smooths only the *task* loss:

* first pass: the source classification loss alone; ``first_step`` perturbs the feature extractor
  and the classifier from that gradient (the adversarial loss plays no part in ``e``);
* second pass, at ``w + e``: classification loss + ``trade_off`` * domain-adversarial loss;
  the discriminator steps with its own plain optimizer, then ``second_step`` restores ``w`` and
  steps the backbone with the perturbed-point gradient.

    python examples/sam_sdat.py --steps 300

Synthetic data: the target domain is the source domain rotated and shifted; the target labels are
used only to report the accuracy.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def make_domains(n=1024, dim=8, classes=3, shift=1.5, angle=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 2.5
    ys, yt = torch.randint(0, classes, (n,), generator=gen), torch.randint(0, classes, (n,), generator=gen)
    xs = centers[ys] + torch.randn(n, dim, generator=gen)
    rot = torch.eye(dim)
    c, s = math.cos(angle), math.sin(angle)
    rot[:2, :2] = torch.tensor([[c, -s], [s, c]])
    xt = (centers[yt] + torch.randn(n, dim, generator=gen)) @ rot.T + shift
    return xs, ys, xt, yt


class Net(nn.Module):
    def __init__(self, dim=8, hidden=32, classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        f = self.features(x)
        return self.head(f), f


def make_discriminator(hidden=32):
    return nn.Sequential(nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 1))


def domain_adversarial_loss(disc, f_s, f_t, coeff=1.0):
    """DANN's loss through the gradient-reversal layer: the discriminator learns, the features fool it."""
    logits = disc(GradientReversal.apply(torch.cat([f_s, f_t]), coeff)).squeeze(1)
    labels = torch.cat([torch.ones(len(f_s)), torch.zeros(len(f_t))]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, labels)


def sdat_step(model, disc, optimizer, disc_optimizer, xs, ys, xt, trade_off):
    """One SDAT step; returns (task loss, the perturbation e as a list of tensors)."""
    # First pass: the task loss only -> the perturbation.
    logits_s, _ = model(xs)
    task_loss = F.cross_entropy(logits_s, ys)
    task_loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.first_step(zero_grad=True)
    e = [p.detach() - b for p, b in zip(model.parameters(), before)]
    # Second pass at w + e: task loss + the domain-adversarial loss.
    disc_optimizer.zero_grad()
    logits_s, f_s = model(xs)
    _, f_t = model(xt)
    loss = F.cross_entropy(logits_s, ys) + trade_off * domain_adversarial_loss(disc, f_s, f_t)
    loss.backward()
    disc_optimizer.step()                 # the discriminator: its own, plain optimizer
    optimizer.second_step(zero_grad=True)  # restore w, step the backbone and head
    return task_loss.detach(), e


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x)[0].argmax(1) == y).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--trade-off", type=float, default=1.0)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    xs, ys, xt, yt = make_domains()
    model, disc = Net(), make_discriminator()
    optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=0.05, momentum=0.9)
    disc_optimizer = torch.optim.SGD(disc.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        i = torch.randint(0, len(ys), (args.batch_size,))
        j = torch.randint(0, len(yt), (args.batch_size,))
        loss, _ = sdat_step(model, disc, optimizer, disc_optimizer, xs[i], ys[i], xt[j], args.trade_off)
        if step % 100 == 0:
            print(f"step {step}: task loss {loss.item():.3f}")
    print(f"source accuracy {accuracy(model, xs, ys):.3f}")
    print(f"target accuracy {accuracy(model, xt, yt):.3f}")
    return model


if __name__ == "__main__":
    main()
