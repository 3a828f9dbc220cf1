"""Rewrite the README's results block from the stored benchmark rows (never typed by hand).

The block sits between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in ``README.md``; it
holds, per device (its latest run in ``bench/results/results.csv``): the optimizer-side ops
(fastest fastsam backend vs the per-parameter baseline and pytorch-optimizer's SAM), SDS
selection, end-to-end throughput relative to SGD, and the plot made by ``bench/plot.py``.

Run: ``python -m fastsam.bench.report [--results FILE] [--readme FILE | --print]``. Defaults: inside
the source tree, ``bench/results/results.csv`` and the checkout's ``README.md``; elsewhere (an
installed package), ``results.csv`` and ``README.md`` in the current directory. ``--print`` writes
the block to stdout instead of rewriting a README.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import harness
from .plot import KERNEL_OPS, slug

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
README = harness.SOURCE_ROOT / "README.md" if harness.SOURCE_ROOT else None   # the checkout's, when there is one


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _metrics(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, float]]:
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        out.setdefault((r["op"], r["size"], r["provider"]), {})[r["metric"]] = float(r["value"])
    return out


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def device_section(device: str, rows: list[dict], png_dir: str | None) -> list[str]:
    m = _metrics(rows)
    copy = next((float(r["value"]) for r in rows if r["op"] == "copy" and r["metric"] == "gbps"), None)
    runs = sorted({(r["timestamp"], r["torch"], r["triton"], r["commit"]) for r in rows}, reverse=True)
    lines = [f"#### {device}", ""]
    lines += [("Runs: " if len(runs) > 1 else "Run: ")
              + "; ".join(f"{t} (torch {tv}, triton {trv}, commit `{c}`)" for t, tv, trv, c in runs)
              + (f". Copy bandwidth at the start of the latest run: {copy:.1f} GB/s (read + write)." if copy else "."),
              ""]

    # Optimizer-side ops.
    body = []
    sizes_in_order = list(dict.fromkeys(r["size"] for r in rows if r["op"] in KERNEL_OPS))
    sizes_in_order.sort(key=harness.size_value)
    for op in KERNEL_OPS:
        for size in sizes_in_order:
            provs = {p: v for (o, s, p), v in m.items() if o == op and s == size and "median_ms" in v}
            if not provs:
                continue
            ours = {p: v for p, v in provs.items() if p.startswith("fastsam-") and not p.endswith("+compile")}
            if not ours:
                continue
            best = min(ours, key=lambda p: ours[p]["median_ms"])
            peers = {p: v for p, v in provs.items() if p in harness.PEERS}
            peer = min(peers, key=lambda p: peers[p]["median_ms"]) if peers else None
            base = provs.get(harness.BASELINE)
            comp = {p: v for p, v in provs.items() if p.endswith("+compile")}
            launches = " / ".join(str(int(v["launches"])) if v and "launches" in v else "-"
                                  for v in (ours[best], base, provs.get(peer) if peer else None))
            frac = ours[best].get("bw_fraction")
            body.append([op, size.split(":")[0] + f" ({harness.size_value(size) / 1e6:.1f}M)",
                         f"{_ms(ours[best]['median_ms'])} ({best[8:]})", _ms(base["median_ms"] if base else None),
                         f"{_ms(peers[peer]['median_ms'])} ({peer[5:] or 'its norm'})" if peer else "-",
                         _x(ours[best].get("speedup_vs_baseline")), _x(ours[best].get("speedup_vs_peer")),
                         "-" if frac is None else f"{frac:.0%}", launches,
                         ", ".join(f"{p}: {_ms(v['median_ms'])}" for p, v in comp.items()) or "-"])
    if body:
        lines += ["Optimizer side of a SAM step (no forward/backward), median ms; speed-ups are medians of "
                  "per-round ratios; *of copy* is the achieved GB/s (DESIGN.md's bytes) over the copy "
                  "bandwidth (on CPU a copy timed in the same rounds; one CPU copy stream is not the ceiling, "
                  "so values above 100% occur); launches are device kernels (GPU) or dispatched aten ops "
                  "(CPU); a provider missing from a row was skipped, and `fastsam bench` prints why:", ""]
        lines += _table(["op", "set", "fastsam", "baseline", "peer", "x baseline", "x peer", "of copy",
                         "launches fastsam / baseline / peer", "torch.compile"], body)
        lines.append("")

    # SDS selection.
    sds_sizes = sorted({s for (o, s, _p) in m if o == "sds_select"}, key=harness.size_value)
    if sds_sizes:
        provs = list(dict.fromkeys(p for (o, _s, p) in m if o == "sds_select"))
        body = [[s.split(",")[0][2:]] + [f"{m[('sds_select', s, p)]['median_ms'] * 1e3:.0f}"
                                          if ("sds_select", s, p) in m else "-" for p in provs] for s in sds_sizes]
        lines += ["SDS selection of k = B/2 samples, median us (baseline: the official ESAM code's "
                  "threshold + mask, which keeps k - 1 and syncs):", ""]
        lines += _table(["B"] + provs, body)
        lines.append("")

    # End to end.
    e2e = sorted({(o, s) for (o, s, _p) in m if o.startswith("e2e_")})
    if e2e:
        provs = list(dict.fromkeys(p for (o, _s, p) in m if o.startswith("e2e_")))
        body = []
        for op, size in e2e:
            cells = []
            for p in provs:
                v = m.get((op, size, p))
                cells.append("-" if not v or "images_per_s" not in v else
                             f"{v['images_per_s']:.0f} ({v.get('ratio_to_sgd', float('nan')):.2f}x)")
            body.append([f"{op[4:]} ({size})"] + cells)
        lines += ["End to end on synthetic data (SGD base; each timed sample is 5 steps, one LookSAM cycle; "
                  "the model settings are in the first column), images/s (ratio to SGD, paired per round). "
                  "ESAM paper (V100, CIFAR-10 ResNet-18, batch 128): SAM 0.51x, ESAM 0.71x:", ""]
        lines += _table(["model (settings)"] + provs, body)
        lines.append("")
    if png_dir is not None:
        lines += [f"![{device}]({png_dir}/{slug(device)}.png)", ""]
    return lines


def render(results: Path | str | None = None, png_dir: str | None = "bench/results") -> str:
    runs = harness.latest_runs(harness.read_rows(results))
    lines = [BEGIN, "<!-- generated by `python -m fastsam.bench.report` from bench/results/results.csv: "
                    "do not edit by hand -->", ""]
    if not runs:
        lines += ["No stored results yet: run `fastsam bench`.", ""]
    # GPUs first: they are what the kernels are for.
    for device in sorted(runs, key=lambda d: (d.startswith("CPU"), d)):
        lines += device_section(device, runs[device], png_dir)
    lines.append(END)
    return "\n".join(lines)


def default_readme() -> Path:
    """The checkout's README inside the source tree, else ``README.md`` in the current directory."""
    return README if README is not None and harness.in_source_tree() else Path.cwd() / "README.md"


def png_dir_for(readme: Path | str, results: Path | str | None) -> str:
    """Where the plots (next to the results file) are, as a link relative to the README's folder."""
    rel = os.path.relpath(harness.results_path(results).resolve().parent, Path(readme).resolve().parent)
    return Path(rel).as_posix()


def rewrite(readme: Path | str | None = None, results: Path | str | None = None) -> bool:
    """Replace the marked block of ``readme``; returns whether the file changed."""
    readme = Path(readme) if readme else default_readme()
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"fastsam.bench.report: {readme} has no {BEGIN} ... {END} block to rewrite")
    new = pattern.sub(lambda _m: render(results, png_dir_for(readme, results)), text, count=1)
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=None, help="results CSV or its directory (default: bench/results/ inside "
                                                    "the source tree, else the current directory)")
    ap.add_argument("--readme", default=None, help="the README to rewrite (default: the checkout's inside the source "
                                                   "tree, else README.md in the current directory)")
    ap.add_argument("--print", action="store_true", help="print the block instead of rewriting the README")
    args = ap.parse_args(argv)
    results = harness.results_path(args.results)
    if not results.is_file():
        print(f"fastsam.bench.report: no results file {results}: run `fastsam bench --out {results}` first, "
              "or pass --results FILE", file=sys.stderr)
        return 2
    if args.print:
        print(render(results, png_dir_for(Path.cwd() / "README.md", results)))
        return 0
    readme = Path(args.readme) if args.readme else default_readme()
    if not readme.is_file():
        print(f"fastsam.bench.report: no README file {readme} to rewrite: pass --readme FILE (one holding the "
              f"{BEGIN} ... {END} block) or --print", file=sys.stderr)
        return 2
    changed = rewrite(readme, results)
    print(f"{readme}: {'rewritten' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
