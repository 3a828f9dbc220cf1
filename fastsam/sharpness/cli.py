"""``fastsam sharpness DIR``: how flat are the minima that ``fastsam train --save DIR`` kept?

For every model in ``DIR`` (one file per optimizer and seed) it measures, on the model's own
training data (the digits split and label noise of its seed, regenerated from the saved settings):

* test accuracy;
* m-sharpness (:func:`fastsam.sharpness.m_sharpness`): mean over ``m``-sample shards of the worst
  loss increase within an L2 ball of radius ``rho``, found by projected gradient ascent;
* the largest Hessian eigenvalue (Lanczos) and the Hessian trace (Hutchinson);
* a 1-D loss slice along a filter-normalised random direction (Li et al. 2018).

It prints one table, one row per optimizer (mean +- std over its seeds), and writes one figure with
every optimizer's 1-D curve. Every model is measured in eval mode (BatchNorm on its running
statistics) and is left unchanged.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import torch
import torch.nn.functional as F

SAVE_FORMAT = "fastsam-train-model/1"


def save_model(path: str, *, optimizer: str, seed: int, noise: float, model, test_accuracy: float,
               epochs: int) -> None:
    """What ``fastsam train --save`` writes per trained model (read back by :func:`load_models`)."""
    torch.save({"format": SAVE_FORMAT, "optimizer": optimizer, "seed": int(seed), "noise": float(noise),
                "epochs": int(epochs), "test_accuracy": float(test_accuracy),
                "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}, path)


def load_models(directory: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(directory, "*.pt")))
    out = []
    for f in files:
        entry = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(entry, dict) or entry.get("format") != SAVE_FORMAT:
            continue
        entry["path"] = f
        out.append(entry)
    if not out:
        raise SystemExit(f"no saved models in {directory!r}; make them with: fastsam train --save {directory}")
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from fastsam.train import _HelpFormatter

    if parser is None:
        parser = argparse.ArgumentParser(prog="fastsam sharpness", description=__doc__)
    parser.formatter_class = _HelpFormatter
    p = parser
    p.add_argument("dir", help="folder written by fastsam train --save DIR")
    p.add_argument("--samples", type=int, default=1024,
                   help="training samples for m-sharpness and the landscape (the first of the seed's split)")
    p.add_argument("--hessian-samples", type=int, default=512, help="training samples for the Hessian")
    p.add_argument("--rho", type=float, default=0.05, help="m-sharpness ball radius (L2, in weight space)")
    p.add_argument("--m", type=int, default=128, help="m-sharpness shard size")
    p.add_argument("--steps", type=int, default=10, help="m-sharpness ascent steps")
    p.add_argument("--adaptive", action="store_true", help="adaptive m-sharpness: the ball scaled by |w|")
    p.add_argument("--hessian-iters", type=int, default=30, help="power iterations for lambda_max (at most)")
    p.add_argument("--trace-samples", type=int, default=20, help="Hutchinson samples for the trace (at most)")
    p.add_argument("--landscape-steps", type=int, default=25, help="points of the 1-D slice")
    p.add_argument("--span", type=float, default=1.0, help="the slice covers [-span, span] x direction")
    p.add_argument("--figure", default=None, help="landscape PNG (default: DIR/landscape.png)")
    p.add_argument("--linear", action="store_true", help="linear loss axis in the figure (default: logarithmic)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (torch.set_num_threads); 0 keeps torch's default. One thread is the fastest "
                        "for this 24k-parameter network, by far on a loaded machine")
    return p


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def measure(entry: dict, args, device) -> dict:
    from fastsam import sharpness as fs
    from fastsam.train import DigitsNet, accuracy, load_digits_tensors

    x_train, y_train, x_test, y_test = load_digits_tensors(entry["noise"], entry["seed"], device)
    model = DigitsNet().to(device)
    model.load_state_dict(entry["state_dict"])
    model.eval()

    def batches(n, size=256):
        return [(x_train[i:min(i + size, n)], y_train[i:min(i + size, n)]) for i in range(0, n, size)]

    data = batches(min(args.samples, len(y_train)))
    hdata = batches(min(args.hessian_samples, len(y_train)))
    out = {"optimizer": entry["optimizer"], "seed": entry["seed"], "test_accuracy": accuracy(model, x_test, y_test)}
    model.eval()
    out["m_sharpness"] = fs.m_sharpness(model, F.cross_entropy, data, rho=args.rho, m=args.m, steps=args.steps,
                                        adaptive=args.adaptive).mean
    out["lambda_max"] = fs.hessian_eigenvalues(model, F.cross_entropy, hdata, k=1, max_iter=args.hessian_iters,
                                               tol=1e-3)[0]
    out["trace"] = fs.hessian_trace(model, F.cross_entropy, hdata, max_iter=args.trace_samples, tol=0.02)
    out["landscape"] = fs.loss_landscape(model, F.cross_entropy, data, dims=1, steps=args.landscape_steps,
                                         span=args.span, seed=0)
    return out


def run(args) -> list[dict]:
    from tqdm.auto import tqdm

    from fastsam import sharpness as fs

    if args.samples < args.m or args.m < 1:
        raise SystemExit("--m must be >= 1 and at most --samples")
    device = torch.device(args.device)
    if args.threads < 0:
        raise SystemExit("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = load_models(args.dir)
    t0 = time.perf_counter()
    results = []
    with tqdm(total=len(entries), unit="model", dynamic_ncols=True) as bar:
        for entry in entries:
            bar.set_postfix_str(f"{entry['optimizer']} seed {entry['seed']}")
            results.append(measure(entry, args, device))
            bar.update(1)
    elapsed = time.perf_counter() - t0

    from fastsam.train import OPTIMIZERS

    order = {name: i for i, name in enumerate(OPTIMIZERS)}  # the registry's order: sgd, sam, asam, ...
    names = sorted(dict.fromkeys(r["optimizer"] for r in results), key=lambda n: (order.get(n, len(order)), n))
    ball = "adaptive " if args.adaptive else ""
    print(f"fastsam sharpness: {len(results)} model(s) from {args.dir}; m-sharpness: {ball}rho={args.rho}, "
          f"m={args.m}, {args.steps} ascent steps on {args.samples} training samples; Hessian on "
          f"{args.hessian_samples} training samples; device {device}, {torch.get_num_threads()} thread(s)")
    header = (f"{'optimizer':<12} {'models':>6} {'test acc':>15} {'m-sharpness':>19} {'lambda_max':>17} "
              f"{'trace':>17}")
    print(header)
    curves = {}
    for name in names:
        rows = [r for r in results if r["optimizer"] == name]
        cells = []
        for key, fmt in (("test_accuracy", ".3f"), ("m_sharpness", ".4f"), ("lambda_max", ".2f"), ("trace", ".1f")):
            mean, std = _mean_std([r[key] for r in rows])
            cells.append(f"{mean:{fmt}} ± {std:{fmt}}")
        print(f"{name:<12} {len(rows):>6} {cells[0]:>15} {cells[1]:>19} {cells[2]:>17} {cells[3]:>17}")
        first = rows[0]["landscape"]
        losses = torch.stack([r["landscape"].losses for r in rows]).mean(0)
        curves[name] = fs.Landscape(first.coords, losses, [], statistics.fmean(r["landscape"].center_loss
                                                                                 for r in rows))
    figure = args.figure or os.path.join(args.dir, "landscape.png")
    try:
        fs.plot_landscape(curves, figure, ylabel="training loss (noisy labels)", log_scale=not args.linear,
                          title="1-D loss slices along a filter-normalised random direction")
        print(f"landscape figure: {figure}")
    except ImportError as exc:
        print(f"landscape figure not written: {exc}")
    print(f"total {elapsed:.0f} s")
    return results


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0
