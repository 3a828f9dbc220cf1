"""timm + fastsam: a timm model (``pretrained=False``), timm's optimizer factory as SAM's base, timm's
cosine scheduler with warm-up, and mixed precision (``torch.amp``: fp16 with a GradScaler; on CPU
too), on synthetic images.

    pip install 'fastsam[timm]'
    python examples/sam_timm.py --model test_vit --epochs 2
    python examples/sam_timm.py --model resnet18 --epochs 10 --size 32 --no-amp

The step is fastsam's two-call form around the scaler (see examples/sam_amp.py): the first-pass
gradient may stay scaled (SAM's direction g/||g|| does not depend on the scale), the second-pass
gradient is unscaled for clipping, and ``scaler.step`` restores the weights and takes the base
step, skipping it on the device when the scaled gradients overflowed.
"""

import argparse

import timm
import timm.scheduler
import torch
import torch.nn.functional as F

from fastsam.integrations.timm import create_sam


def make_data(n, size, classes, seed):
    """Images whose class is the colour channel holding a bright square (plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen) * 0.5
    y = torch.randint(0, classes, (n,), generator=gen)
    for i in range(n):
        r, c = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        x[i, y[i] % 3, r:r + size // 2, c:c + size // 2] += 1.5 if y[i] < 3 else -1.5
    return x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="test_vit", help="any timm model name (built with pretrained=False)")
    ap.add_argument("--opt", default="sgd", help="timm optimizer name (sgd, adamw, lamb, ...)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--no-amp", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = 6
    model = timm.create_model(args.model, pretrained=False, num_classes=classes).to(device)
    optimizer = create_sam(model, opt=args.opt, lr=0.05 if args.opt == "sgd" else 2e-3, weight_decay=5e-4,
                           rho=args.rho)
    x, y = make_data(args.train_samples, args.size, classes, seed=1)
    steps_per_epoch = len(x) // args.batch_size
    scheduler, epochs = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                                           warmup_epochs=1, warmup_lr=1e-3, step_on_epochs=False,
                                                           updates_per_epoch=steps_per_epoch)
    amp = not args.no_amp
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def loss_of(xb, yb):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            return F.cross_entropy(model(xb), yb)

    updates = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            loss = loss_of(xb, yb)
            scaler.scale(loss).backward()
            optimizer.first_step(zero_grad=True)
            scaler.scale(loss_of(xb, yb)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(optimizer)            # restore + base step (skipped on overflow, on the device)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            scheduler.step_update(num_updates=updates)
        scheduler.step(epoch + 1)
        print(f"epoch {epoch}: loss {loss.item():.3f}, lr {optimizer.param_groups[0]['lr']:.4f}")

    model.eval()
    xt, yt = make_data(256, args.size, classes, seed=2)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        accuracy = (model(xt.to(device)).argmax(-1).cpu() == yt).float().mean().item()
    print(f"{args.model} with SAM over timm's {args.opt}: test accuracy {accuracy:.3f} "
          f"(loss scale {scaler.get_scale() if amp else 1.0:g})")


if __name__ == "__main__":
    main()
