"""Sharp-MAML (Abbas et al., "Sharp-MAML: Sharpness-Aware Model-Agnostic Meta Learning", ICML 2022):
SAM in MAML's outer loop, optionally in the inner loop too, with torch.func and fastsam.SAM.

MAML (Finn et al., ICML 2017) learns an initialisation ``theta`` that adapts to a new task in a
few gradient steps: for each task, ``theta_i = theta - alpha grad L_support(theta)`` (inner loop),
and the meta-loss is the query loss at the adapted weights, ``mean_i L_query(theta_i)`` (outer
loop), differentiated through the inner step (second order; ``--first-order`` drops that).

* outer SAM (Sharp-MAML's "up"): fastsam.SAM perturbs ``theta`` along the meta-gradient and the
  update is the meta-gradient at ``theta + e``: the two-call form around two meta-loss backwards;
* inner SAM (``--inner-rho > 0``, Sharp-MAML's "low"/"both"): each task's adaptation step uses the
  support gradient at ``theta + e_in``, ``e_in = rho_in g / ||g||``, written functionally.

Tasks: sine regression ``y = a sin(x + b)`` (Finn et al.), K support and K query points each.

    python examples/sam_sharp_maml.py --steps 300
    python examples/sam_sharp_maml.py --steps 300 --inner-rho 0.01
"""

import argparse
import math

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

import fastsam


def make_model():
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def sample_tasks(n_tasks, k, gen):
    """(x_support, y_support, x_query, y_query), each [n_tasks, k, 1]."""
    amp = torch.rand(n_tasks, 1, 1, generator=gen) * 4.9 + 0.1
    phase = torch.rand(n_tasks, 1, 1, generator=gen) * math.pi
    xs = torch.rand(n_tasks, 2 * k, 1, generator=gen) * 10 - 5
    ys = amp * torch.sin(xs + phase)
    return xs[:, :k], ys[:, :k], xs[:, k:], ys[:, k:]


def meta_loss(model, params, tasks, inner_lr, inner_rho=0.0, first_order=False):
    """mean over tasks of L_query(theta - inner_lr grad L_support(theta [+ e_in]))."""
    names = list(params)

    def task_loss(p, x, y):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    def adapted_query_loss(xs, ys, xq, yq):
        p = {n: params[n] for n in names}
        g = grad(task_loss)(p, xs, ys)
        if inner_rho > 0:  # inner SAM: the support gradient at p + rho_in g / ||g||
            norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names)) + 1e-12
            g = grad(task_loss)({n: p[n] + inner_rho * g[n] / norm for n in names}, xs, ys)
        if first_order:
            g = {n: g[n].detach() for n in names}
        return task_loss({n: p[n] - inner_lr * g[n] for n in names}, xq, yq)

    return vmap(adapted_query_loss)(*tasks).mean()


def sharp_maml_step(model, optimizer, tasks, inner_lr, inner_rho=0.0, first_order=False):
    """One outer step with SAM: returns the meta-loss at theta."""
    params = dict(model.named_parameters())
    loss = meta_loss(model, params, tasks, inner_lr, inner_rho, first_order)
    loss.backward()                      # meta-gradient at theta
    optimizer.first_step(zero_grad=True)  # theta -> theta + e
    meta_loss(model, params, tasks, inner_lr, inner_rho, first_order).backward()  # meta-gradient at theta + e
    optimizer.second_step(zero_grad=True)
    return loss.detach()


def evaluate(model, inner_lr, n_tasks=100, k=10, seed=123):
    gen = torch.Generator().manual_seed(seed)
    tasks = sample_tasks(n_tasks, k, gen)
    params = {n: p.detach() for n, p in model.named_parameters()}
    return meta_loss(model, params, tasks, inner_lr).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tasks", type=int, default=16, help="tasks per meta-batch")
    ap.add_argument("--k", type=int, default=10, help="support (and query) points per task")
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--rho", type=float, default=0.05, help="outer SAM radius")
    ap.add_argument("--inner-rho", type=float, default=0.0, help="inner SAM radius (0: plain inner step)")
    ap.add_argument("--first-order", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = make_model()
    optimizer = fastsam.SAM(model.parameters(), torch.optim.Adam, rho=args.rho, lr=1e-3)
    before = evaluate(model, args.inner_lr)
    for step in range(args.steps):
        loss = sharp_maml_step(model, optimizer, sample_tasks(args.tasks, args.k, gen), args.inner_lr,
                               args.inner_rho, args.first_order)
        if step % 100 == 0:
            print(f"step {step}: meta-loss {loss.item():.3f}")
    after = evaluate(model, args.inner_lr)
    print(f"held-out meta-loss before {before:.3f} after {after:.3f}")
    return model, before, after


if __name__ == "__main__":
    main()
