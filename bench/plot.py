"""Plot the stored benchmark results: one PNG per device, from its latest measurement of each
(op, size) in the results file.

Panels: for each optimizer-side op, the fraction of the measured copy bandwidth each provider
reaches against the parameter set's size (values, log scale); SDS selection time against the batch
size B (log-log); end-to-end throughput as a ratio to SGD per model. Providers keep one colour in
every panel.

Run: ``python -m fastsam.bench.plot [--results FILE] [--device SUBSTRING]`` (``--results`` defaults
as ``fastsam bench --out`` does: ``bench/results/results.csv`` inside the source tree, else
``results.csv`` in the current directory). Needs matplotlib (``pip install 'fastsam[bench]'``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from . import harness

KERNEL_OPS = ("grad_norm", "first_step", "second_step_sgd", "second_step_adamw", "sam_step_sgd", "sam_step_adamw")
COLORS = {
    "fastsam-cuda": "#d62728", "fastsam-triton": "#ff7f0e", "fastsam-torch": "#1f77b4",
    "fastsam-torch+compile": "#17becf", "foreach+compile": "#9467bd", "baseline-per-param": "#7f7f7f",
    "peer-foreach-off": "#8c564b", "peer-foreach-on": "#e377c2", "peer": "#e377c2", "torch.topk": "#bcbd22",
    "baseline-esam-code": "#7f7f7f",
}


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _series(rows, op: str, metric: str) -> dict[str, list[tuple[float, float, str]]]:
    """provider -> sorted [(x, value, size label)] for one op and metric."""
    out: dict[str, list] = {}
    for r in rows:
        if r["op"] == op and r["metric"] == metric:
            x = harness.size_value(r["size"])
            if not math.isnan(x):
                out.setdefault(r["provider"], []).append((x, float(r["value"]), r["size"]))
    return {k: sorted(v) for k, v in out.items()}


def plot_device(rows: list[dict], device: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in KERNEL_OPS if any(r["op"] == op for r in rows)]
    has_sds = any(r["op"] == "sds_select" for r in rows)
    e2e_ops = sorted({r["op"] for r in rows if r["op"].startswith("e2e_")})
    n = len(ops) + int(has_sds) + int(bool(e2e_ops))
    if n == 0:
        raise SystemExit(f"no plottable rows for {device}")
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    panels = iter(axes.flat)
    for op in ops:
        ax = next(panels)
        series = _series(rows, op, "bw_fraction")
        for provider, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=provider, color=COLORS.get(provider))
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("values in the parameter set")
        ax.set_ylabel("fraction of copy bandwidth")
        ax.grid(True, alpha=0.3)
        labels = sorted({(p[0], p[2].split(":")[0]) for pts in series.values() for p in pts})
        for x, name in labels:
            ax.annotate(name, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=7, color="0.4")
        ax.legend(fontsize=7)
    if has_sds:
        ax = next(panels)
        for provider, pts in _series(rows, "sds_select", "median_ms").items():
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], "o-", label=provider,
                    color=COLORS.get(provider))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title("sds_select (k = B/2)")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("median time (us)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if e2e_ops:
        ax = next(panels)
        providers = []
        for r in rows:
            if r["op"] in e2e_ops and r["metric"] == "ratio_to_sgd" and r["provider"] not in providers:
                providers.append(r["provider"])
        width = 0.8 / max(1, len(e2e_ops))
        for i, op in enumerate(e2e_ops):
            vals = {r["provider"]: float(r["value"]) for r in rows if r["op"] == op and r["metric"] == "ratio_to_sgd"}
            xs = [j + i * width for j in range(len(providers))]
            ax.bar(xs, [vals.get(p, 0.0) for p in providers], width, label=op[4:])
        ax.set_xticks([j + width * (len(e2e_ops) - 1) / 2 for j in range(len(providers))])
        ax.set_xticklabels(providers, rotation=30, fontsize=8)
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.set_title("end to end: throughput / SGD's")
        ax.set_ylabel("images/s ratio to SGD")
        ax.legend(fontsize=7)
    for ax in panels:
        ax.axis("off")
    latest = max(rows, key=lambda r: r["timestamp"])
    stamps = sorted({r["timestamp"] for r in rows})
    fig.suptitle(f"{device}  (torch {latest['torch']}, triton {latest['triton']}, commit {latest['commit']}, "
                 f"{stamps[0]}" + (f" ... {stamps[-1]}" if len(stamps) > 1 else "") + ")", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results: Path | str | None = None, out_dir: Path | str | None = None,
                 device: str | None = None) -> list[Path]:
    """Draw one PNG per device (latest run each); returns the paths written."""
    results = harness.results_path(results)
    out_dir = Path(out_dir) if out_dir else results.parent
    harness.check_writable_location(out_dir / "x.png")
    written = []
    for dev, rows in harness.latest_runs(harness.read_rows(results)).items():
        if device and device.lower() not in dev.lower():
            continue
        written.append(plot_device(rows, dev, out_dir / f"{slug(dev)}.png"))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=None, help="results CSV or its directory (default: bench/results/ inside "
                                                    "the source tree, else the current directory)")
    ap.add_argument("--out-dir", default=None, help="where the PNGs go (default: next to the results file)")
    ap.add_argument("--device", default=None, help="only devices whose name contains this")
    args = ap.parse_args(argv)
    results = harness.results_path(args.results)
    if not results.is_file():
        print(f"fastsam.bench.plot: no results file {results}: run `fastsam bench --out {results}` first, "
              "or pass --results FILE", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastsam.bench.plot: matplotlib is not installed: pip install 'fastsam[bench]' (or matplotlib)",
              file=sys.stderr)
        return 2
    written = plot_results(results, args.out_dir, args.device)
    if not written:
        print("no results to plot")
        return 1
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
