"""A plain PyTorch training loop with fastsam.SAM: the two-call form, BatchNorm handled, gradient
clipping on the second pass, an LR schedule, optional gradient accumulation, a checkpoint/resume, and
the per-step sharpness L(w + e) - L(w) that every SAM step measures for free (fastsam.sharpness.SharpnessLog).

    python examples/sam_plain.py --steps 200
    python examples/sam_plain.py --steps 200 --accumulate 4     # 4 micro-batches per step

Gradient accumulation with SAM needs both passes over the same micro-batches: the perturbation
must come from the gradient of the whole batch (accumulated over every micro-batch), and so must
the update. The loop below keeps the micro-batches of a step and walks them twice. (For per
micro-batch perturbations, which need no second walk over stored data, see fastsam.MSAM.)
"""

import argparse
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam


def make_data(n=2048, dim=20, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 2
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, dim, generator=gen)
    return x, y


def make_model(dim=20, classes=4):
    return nn.Sequential(nn.Linear(dim, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--clip", type=float, default=1.0, help="max norm of the second-pass gradient")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.batch_size % args.accumulate:
        ap.error("--batch-size must be divisible by --accumulate")

    torch.manual_seed(0)
    x, y = make_data()
    x, y = x.to(args.device), y.to(args.device)
    model = make_model().to(args.device)
    optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                            weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    ckpt_path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    micro = args.batch_size // args.accumulate
    log = fastsam.sharpness.SharpnessLog()  # device tensors; read on the host only when printed

    def loss_on(xb, yb):
        return F.cross_entropy(model(xb), yb) / args.accumulate

    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch_size,), device=args.device)
        shards = [(x[idx[i:i + micro]], y[idx[i:i + micro]]) for i in range(0, args.batch_size, micro)]
        loss = perturbed_loss = 0.0
        for xb, yb in shards:                       # first pass: gradient at w, summed over micro-batches
            micro_loss = loss_on(xb, yb)
            micro_loss.backward()
            loss = loss + micro_loss.detach()
        optimizer.first_step(zero_grad=True, loss=loss)  # perturbation from the unclipped gradient
        with fastsam.frozen_running_stats(model):   # running statistics from the first pass only
            for xb, yb in shards:                   # second pass: gradient at w + e
                micro_loss = loss_on(xb, yb)
                micro_loss.backward()
                perturbed_loss = perturbed_loss + micro_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)  # clip what the base step uses
        optimizer.second_step(zero_grad=True, loss=perturbed_loss)  # sets optimizer.sharpness (no sync)
        log.record(optimizer, loss)
        scheduler.step()
        if (step + 1) % 50 == 0:
            print(log.format_last())                # e.g. "step 49 loss 0.2 sharpness 0.004"

        if step == args.steps // 2:  # save and reload mid-run: the run continues exactly
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, ckpt_path)
            ckpt = torch.load(ckpt_path)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])

    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    summary = log.summary()
    print(f"mean loss {summary['loss']:.4f}, mean sharpness L(w+e)-L(w) {summary['sharpness']:.5f} "
          f"over {summary['steps']} steps")
    print(f"train accuracy after {args.steps} SAM steps: {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
