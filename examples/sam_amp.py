"""Mixed precision with fastsam: torch.autocast + torch.amp.GradScaler, no extra host syncs.

    python examples/sam_amp.py --steps 100                    # CPU: bf16 autocast
    python examples/sam_amp.py --steps 100 --device cuda      # GPU: fp16 autocast

The pattern (the only change from a plain SAM loop is the scaler calls):

    scaler.scale(loss).backward()
    optimizer.first_step(zero_grad=True)     # scaled gradients are fine: g/||g|| does not depend on the
                                             # scale; an inf/NaN gradient skips the perturbation
    scaler.scale(loss_at_perturbed_point).backward()
    scaler.unscale_(optimizer)               # only if you clip (clip the second-pass gradient)
    clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)                   # restore + base step; unscale and skip happen on the device
    scaler.update()

FisherSAM needs the true gradient scale: pass ``grad_scaler=scaler`` to ``first_step`` (it then
unscales the first-pass gradients in place). GSAM with ``scaler.unscale_`` needs the same.

Per-step sharpness under a GradScaler: give ``first_step(loss=loss)`` the unscaled loss at ``w`` and
``scaler.step(optimizer, perturbed_loss=loss_at_perturbed_point)`` the one at ``w + e`` (GradScaler
passes keyword arguments on to ``optimizer.step``); ``optimizer.sharpness`` is then their difference.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--optimizer", default="sam", choices=["sam", "asam", "fisher"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 32, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    x, y = x.to(device), y.to(device)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 4)).to(device)
    cls = {"sam": fastsam.SAM, "asam": fastsam.ASAM, "fisher": fastsam.FisherSAM}[args.optimizer]
    optimizer = cls(model.parameters(), torch.optim.AdamW, lr=3e-3, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type)
    log = fastsam.sharpness.SharpnessLog()  # per-step L(w + e) - L(w), kept on the device

    for step in range(args.steps):
        idx = torch.randint(0, len(y), (128,), device=device)
        xb, yb = x[idx], y[idx]
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = F.cross_entropy(model(xb), yb)
        scaler.scale(loss).backward()
        optimizer.first_step(zero_grad=True, grad_scaler=scaler if args.optimizer == "fisher" else None,
                             loss=loss)       # the unscaled loss at w, for optimizer.sharpness
        with torch.autocast(device.type, dtype=amp_dtype):
            loss_perturbed = F.cross_entropy(model(xb), yb)
        scaler.scale(loss_perturbed).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer, perturbed_loss=loss_perturbed)  # GradScaler passes it on to optimizer.step
        scaler.update()
        optimizer.zero_grad()
        log.record(optimizer, loss)

    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype):
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"mean sharpness L(w+e)-L(w) over {len(log)} steps: {log.summary()['sharpness']:.5f}")
    print(f"{args.optimizer} with {amp_dtype} autocast and GradScaler: train accuracy {acc:.3f} "
          f"after {args.steps} steps (loss scale {scaler.get_scale():g})")
    return acc


if __name__ == "__main__":
    main()
