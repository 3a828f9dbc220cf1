"""Time per training step of GSAM, LookSAM and interval SAM next to SAM and SGD, on CPU.

Two measurements, every provider side by side in interleaved rounds of one run (``harness``):

* ``train``: whole training steps (forward, backward(s), optimizer) of a small network on random
  data: fastsam's ``DigitsNet`` (the CNN of ``fastsam train``, 1x8x8 inputs) and a 3-layer MLP.
  Each timed call runs one full cycle of 10 steps (a multiple of every interval measured), so
  LookSAM and interval SAM are charged for their SAM steps and their cheap steps in proportion.
* ``optimizer``: the optimizer side alone on a parameter set of ``bench/param_sets.py`` (random
  gradients, no model): a SAM step (first_step + second_step) of SAM, GSAM and LookSAM, LookSAM's
  cheap step, interval SAM's cheap step, and torch's SGD step. This isolates what the fused ops
  add (GSAM: a gradient copy, ``grad_dot``, ``gsam_combine_``; LookSAM: ``grad_dot`` and
  ``looksam_orthogonal_`` on SAM steps, ``grad_sq_norm`` and ``looksam_combine_`` on cheap ones).

Providers all use SGD with momentum 0.9 and weight decay 5e-4 as the base. Ratios are against SAM
and against SGD measured in the same rounds. Rows go to ``bench/results/gsam_looksam_cpu.csv``.

Run: ``python -m fastsam.bench.bench_gsam_looksam_cpu`` (``--part train|optimizer|both``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import harness
from .param_sets import PARAM_SETS, numel

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
CYCLE = 10  # steps per timed call: a multiple of 2 and 5


def make_optimizer(name: str, params):
    import fastsam

    if name == "sgd":
        return torch.optim.SGD(params, **SGD_KW)
    if name == "sam":
        return fastsam.SAM(params, torch.optim.SGD, rho=0.05, backend="torch", **SGD_KW)
    if name == "gsam":
        return fastsam.GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.4, backend="torch", **SGD_KW)
    if name == "looksam-k5":
        return fastsam.LookSAM(params, torch.optim.SGD, rho=0.05, k=5, alpha=0.7, backend="torch", **SGD_KW)
    if name.startswith("sam-every"):
        every = int(name[len("sam-every"):])
        return fastsam.SAM(params, torch.optim.SGD, rho=0.05, every=every, backend="torch", **SGD_KW)
    raise ValueError(name)


PROVIDERS = ("sgd", "sam", "gsam", "looksam-k5", "sam-every2", "sam-every5")


def mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def models() -> dict:
    from fastsam.train import DigitsNet

    return {"digits-cnn": DigitsNet, "mlp-512": mlp}


def training_cycle(name: str, model: nn.Module, batches):
    """A callable running CYCLE training steps of ``model`` with optimizer ``name``."""
    import fastsam

    opt = make_optimizer(name, model.parameters())

    def cycle():
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            if name == "sgd":
                opt.step()
                opt.zero_grad()
                continue
            if opt.needs_second_pass:
                opt.first_step(zero_grad=True)
                with fastsam.frozen_running_stats(model):
                    F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)

    return cycle


def measure_training(batch: int, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 1, 8, 8, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
               for _ in range(CYCLE)]
    rows = []
    for model_name, make_model in models().items():
        torch.manual_seed(0)
        init = make_model().state_dict()
        fns = {}
        for name in PROVIDERS:
            model = make_model()
            model.load_state_dict(init)
            fns[name] = training_cycle(name, model, batches)
        n_params = sum(p.numel() for p in make_model().parameters())
        timings = harness.time_interleaved(fns, rounds=rounds, warmup=2)
        rows += report("train_step", f"{model_name}:{n_params}params:batch{batch}", timings, per=CYCLE)
    return rows


def measure_optimizer(set_name: str, rounds: int) -> list[dict]:
    shapes = PARAM_SETS[set_name]()
    gen = torch.Generator().manual_seed(0)
    fns = {}

    def fresh_params():
        ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return ps

    import fastsam

    sgd = make_optimizer("sgd", fresh_params())
    fns["sgd"] = sgd.step
    # SAM steps on every call: k = 1 / every = 1. Cheap steps on every call: one SAM step first (for
    # LookSAM's g_v), then an interval longer than the run.
    sam_every_step = {
        "sam": make_optimizer("sam", fresh_params()),
        "gsam": make_optimizer("gsam", fresh_params()),
        "looksam": fastsam.LookSAM(fresh_params(), torch.optim.SGD, rho=0.05, k=1, alpha=0.7, backend="torch",
                                   **SGD_KW),
    }
    for name, opt in sam_every_step.items():
        def sam_step(opt=opt):
            opt.first_step()
            opt.second_step()

        fns[f"{name}:sam-step"] = sam_step
    never = 10 ** 9
    cheap = {"looksam": fastsam.LookSAM(fresh_params(), torch.optim.SGD, rho=0.05, k=never, alpha=0.7,
                                        backend="torch", **SGD_KW),
             "interval-sam": fastsam.SAM(fresh_params(), torch.optim.SGD, rho=0.05, every=never, backend="torch",
                                         **SGD_KW)}
    for name, opt in cheap.items():
        opt.first_step()
        opt.second_step()
        fns[f"{name}:cheap-step"] = opt.second_step
    timings = harness.time_interleaved(fns, rounds=rounds, warmup=2)
    return report("optimizer_step", f"{set_name}:{len(shapes)}x{numel(shapes)}", timings, per=1,
                  reference="sam:sam-step")


def report(op: str, size: str, timings: dict, per: int, reference: str = "sam") -> list[dict]:
    dev = harness.device_name("cpu")
    ref_ms, sgd_ms = timings[reference].median_ms / per, timings["sgd"].median_ms / per
    print(f"\n{op} on {size}, {dev}: median ms per step (p20-p80 spread), ratio to {reference} and to sgd")
    rows = []
    for name, t in timings.items():
        ms = t.median_ms / per
        print(f"  {name:<24} {ms:9.3f} ms  ({t.spread:5.1%})   x{ms / ref_ms:5.2f} {reference}   x{ms / sgd_ms:5.2f} sgd")
        rows.append(dict(op=op, provider=name, size=size, metric="median_ms_per_step", value=f"{ms:.4f}", device=dev))
        rows.append(dict(op=op, provider=name, size=size, metric=f"ratio_to_{reference}", value=f"{ms / ref_ms:.4f}",
                         device=dev))
        rows.append(dict(op=op, provider=name, size=size, metric="ratio_to_sgd", value=f"{ms / sgd_ms:.4f}",
                         device=dev))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="both", choices=("train", "optimizer", "both"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--set", default="resnet18", choices=sorted(PARAM_SETS), help="parameter set (optimizer part)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="CSV file or directory (default: gsam_looksam_cpu.csv in bench/results/ "
                    "inside the source tree, else in the current directory)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.part in ("train", "both"):
        rows += measure_training(args.batch, args.rounds)
    if args.part in ("optimizer", "both"):
        rows += measure_optimizer(args.set, args.rounds)
    path = harness.append_rows(rows, harness.results_path(args.out, "gsam_looksam_cpu.csv"))
    print(f"\nrows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
