"""The optimizer side of one SAM step (first_step + second_step, SGD-momentum base), per provider.

Providers, measured side by side in one run on the same parameter set:

* ``fastsam-<backend>``     - fastsam.SAM on each available backend
* ``baseline-per-param``    - the classic per-parameter loop (``bench/baselines.py``)
* ``peer-foreach-off/on``   - pytorch-optimizer's SAM with ``foreach`` off and on (if installed)

Run: ``python -m fastsam.bench.bench_sam_step --set resnet18 --device cpu``.
"""

from __future__ import annotations

import argparse

import torch

from . import harness
from .baselines import PerParameterSAM
from .param_sets import PARAM_SETS, numel

SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def providers(device: torch.device) -> dict:
    import fastsam
    from fastsam import ops

    out = {}
    for backend in ops.BACKENDS:
        if ops.supports(backend, "perturb", device, torch.float32)[0] and not (
                backend == "triton" and device.type == "cpu"):
            out[f"fastsam-{backend}"] = lambda ps, b=backend: fastsam.SAM(ps, torch.optim.SGD, backend=b, **SGD_KW)
    out["baseline-per-param"] = lambda ps: PerParameterSAM(ps, torch.optim.SGD, **SGD_KW)
    try:
        from pytorch_optimizer import SAM as PeerSAM

        out["peer-foreach-off"] = lambda ps: PeerSAM(ps, torch.optim.SGD, foreach=False, **SGD_KW)
        out["peer-foreach-on"] = lambda ps: PeerSAM(ps, torch.optim.SGD, foreach=True, **SGD_KW)
    except ImportError:
        print("pytorch-optimizer is not installed: skipping the peer (pip install pytorch-optimizer)")
    return out


def measure(set_name: str, device: torch.device, reps: int = 30) -> list[dict]:
    """Time every provider on its own copy of the parameter set (interleaved rounds on CPU)."""
    shapes = PARAM_SETS[set_name]()
    gen = torch.Generator(device="cpu").manual_seed(0)
    steps = {}
    for name, make in providers(device).items():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-3
        opt = make(params)

        def sam_step(opt=opt):
            opt.first_step()
            opt.second_step()

        steps[name] = sam_step
    if device.type == "cuda":
        timings = {name: harness.time_fn(fn, device) for name, fn in steps.items()}
    else:
        timings = harness.time_interleaved(steps, rounds=reps)
    size = f"{set_name}:{len(shapes)}x{numel(shapes)}"
    dev = harness.device_name(device)
    rows = []
    for name, t in timings.items():
        rows.append(dict(op="sam_step_sgd", provider=name, size=size, metric="median_ms", value=f"{t.median_ms:.4f}",
                         device=dev))
        rows.append(dict(op="sam_step_sgd", provider=name, size=size, metric="spread_p20_p80",
                         value=f"{t.spread:.4f}", device=dev))
        print(f"{set_name:>10} {name:<22} {t.median_ms:9.3f} ms  (p20-p80 spread {t.spread:.1%})")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="resnet18", choices=sorted(PARAM_SETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None, help="CSV file to append to (default bench/results/results.csv)")
    args = ap.parse_args(argv)
    rows = measure(args.set, torch.device(args.device), args.reps)
    times = {r["provider"]: float(r["value"]) for r in rows if r["metric"] == "median_ms"}
    fast = min(v for k, v in times.items() if k.startswith("fastsam"))
    for k, v in times.items():
        if not k.startswith("fastsam"):
            print(f"speed-up of fastsam over {k}: {v / fast:.2f}x")
    path = harness.append_rows(rows, args.out)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
