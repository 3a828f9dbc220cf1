"""Time per training step of ESAM and mSAM relative to SAM and SGD, on a small CNN, side by side.

Every provider trains its own copy of the same network (same initial weights) on the same random
batch; one "step" is everything a training loop does per batch (forward/backward passes plus the
optimizer), timed in interleaved rounds (``harness.time_interleaved``) so that all providers see
the same machine load. Providers:

* ``sgd``                    one forward/backward + SGD step
* ``sam``                    fastsam.SAM (two forward/backwards)
* ``esam-element`` / ``esam-tensor``   fastsam.ESAM, beta = gamma = 0.5, the two SWP modes
* ``esam-sds-only``          fastsam.ESAM, beta = 1, gamma = 0.5 (data selection only)
* ``msam-loop-m{2,4}``       fastsam.MSAM (shards one after another, gradients accumulated)
* ``msam-vmap-m{2,4}``       the alternative: all shards in one ``torch.func.vmap`` call over
                             stacked shards and ``m`` stacked copies of the perturbed weights
                             (written here, not in the library; BatchNorm statistics frozen in it,
                             which flatters it slightly)

Models: ``digits`` (fastsam.train.DigitsNet, 1x8x8 inputs, batch 64, BatchNorm) and ``cifar``
(a small CIFAR-style CNN without BatchNorm, 3x32x32 inputs, batch 128).

Run: ``python -m bench.bench_esam_msam_cpu [--model digits,cifar] [--rounds 20]``. Rows go to
``bench/results/esam_msam_cpu.csv``.

One run on the development machine (x86_64, 2 cores shared with other jobs, so the p20-p80
spreads were 20-50%; ``--threads 1 --rounds 30``; torch 2.13 CPU, torch backend), median ms per
step and the ratio to SAM measured in the same interleaved rounds (rows in
``bench/results/esam_msam_cpu.csv``):

    provider          digits (B=64, 20k params)   cifar (B=128 3x32x32, 95k params)
    sgd                   8.2 ms  0.56                801 ms  0.48
    sam                  14.6 ms  1.00               1684 ms  1.00
    esam-element         18.8 ms  1.29               1388 ms  0.82
    esam-tensor          14.7 ms  1.01               1333 ms  0.79
    esam-sds-only        15.3 ms  1.05               1439 ms  0.85
    msam-loop-m2         17.5 ms  1.20               1183 ms  0.70
    msam-vmap-m2         31.3 ms  2.15               2087 ms  1.24
    msam-loop-m4         26.1 ms  1.79               1068 ms  0.63
    msam-vmap-m4         32.4 ms  2.22               2017 ms  1.20

The tiny digits network is bound by per-op overhead, so extra passes and launches cost and
ESAM's element mode pays for the torch backend's Philox (about 100 int64 ops per weight on CPU;
the GPU kernels draw it in registers). On the compute-bound CIFAR-style network ESAM saves
15-21% of SAM's step, and the mSAM loop is faster than SAM on this CPU (smaller shards keep the
activations in cache). The vmapped shards lost everywhere (grouped convolutions, ``m`` weight
copies), which is why ``fastsam.MSAM`` runs the loop.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import harness

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


class CifarCNN(nn.Module):
    """conv(3->32) - conv(32->64) - pool - conv(64->128) - pool - linear: about 0.1M parameters."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.fc(x.mean(dim=(2, 3)))


def make_model(name: str) -> tuple[nn.Module, tuple, int]:
    torch.manual_seed(0)
    if name == "digits":
        from fastsam.train import DigitsNet

        return DigitsNet(), (1, 8, 8), 64
    if name == "cifar":
        return CifarCNN(), (3, 32, 32), 128
    raise ValueError(name)


class VmapMSAM:
    """mSAM with every shard in one vmapped call (plain SAM perturbation, SGD base): the measured alternative."""

    def __init__(self, model: nn.Module, micro_batches: int, rho: float = 0.05):
        self.model, self.m, self.rho = model, micro_batches, rho
        self.names = [n for n, _ in model.named_parameters()]
        self.params = list(model.parameters())
        self.base = torch.optim.SGD(self.params, **SGD_KW)

    def step(self, x, y):
        import fastsam
        from torch.func import functional_call, grad, vmap

        m, model, names = self.m, self.model, self.names
        xs, ys = x.view(m, -1, *x.shape[1:]), y.view(m, -1)
        buffers = dict(model.named_buffers())

        def shard_loss(params, xb, yb):
            return F.cross_entropy(functional_call(model, ({**dict(zip(names, params)), **buffers}), (xb,)), yb)

        w = tuple(p.detach() for p in self.params)
        with fastsam.frozen_running_stats(model):
            g = vmap(grad(shard_loss), in_dims=(None, 0, 0))(w, xs, ys)
            sq = torch.stack([gi.pow(2).flatten(1).sum(1) for gi in g]).sum(0)  # (m,) per-shard squared norms
            scale = self.rho / (sq.sqrt() + 1e-12)
            perturbed = tuple(wi.unsqueeze(0) + scale.view(m, *([1] * wi.dim())) * gi for wi, gi in zip(w, g))
            g2 = vmap(grad(shard_loss), in_dims=(0, 0, 0))(perturbed, xs, ys)
        for p, gi in zip(self.params, g2):
            p.grad = gi.mean(0)
        self.base.step()
        self.base.zero_grad()
        return None


def providers(model_name: str, micro: tuple[int, ...]) -> dict:
    import fastsam

    base_model, shape, batch = make_model(model_name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    out = {}

    def fresh():
        return copy.deepcopy(base_model)

    def closure_for(model):
        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")
        return closure

    m_sgd = fresh()
    sgd = torch.optim.SGD(m_sgd.parameters(), **SGD_KW)

    def sgd_step():
        F.cross_entropy(m_sgd(x), y).backward()
        sgd.step()
        sgd.zero_grad()

    out["sgd"] = sgd_step

    m_sam = fresh()
    sam = fastsam.SAM(m_sam.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)

    def sam_step():
        F.cross_entropy(m_sam(x), y).backward()
        sam.first_step(zero_grad=True)
        with fastsam.frozen_running_stats(m_sam):
            F.cross_entropy(m_sam(x), y).backward()
        sam.second_step(zero_grad=True)

    out["sam"] = sam_step

    for name, kw in (("esam-element", dict(beta=0.5, gamma=0.5, swp="element")),
                     ("esam-tensor", dict(beta=0.5, gamma=0.5, swp="tensor")),
                     ("esam-sds-only", dict(beta=1.0, gamma=0.5))):
        model = fresh()
        opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, seed=0, **kw, **SGD_KW)
        out[name] = lambda opt=opt, c=closure_for(model): opt.step(c)

    for m in micro:
        model = fresh()
        opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=m, model=model, **SGD_KW)
        out[f"msam-loop-m{m}"] = lambda opt=opt, c=closure_for(model): opt.step(c, batch_size=batch)
        vm = VmapMSAM(fresh(), m)
        out[f"msam-vmap-m{m}"] = lambda vm=vm: vm.step(x, y)
    return out, f"{model_name}:B{batch}x{'x'.join(map(str, shape))}:{sum(p.numel() for p in base_model.parameters())}p"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits,cifar")
    ap.add_argument("--micro", default="2,4")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--out", default=None, help="CSV file or directory (default: esam_msam_cpu.csv in bench/results/ "
                    "inside the source tree, else in the current directory)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    micro = tuple(int(v) for v in args.micro.split(","))
    dev = harness.device_name("cpu")
    rows = []
    for model_name in args.model.split(","):
        fns, size = providers(model_name, micro)
        timings = harness.time_interleaved(fns, rounds=args.rounds)
        sam_ms, sgd_ms = timings["sam"].median_ms, timings["sgd"].median_ms
        print(f"\n{size} on {dev}")
        print(f"{'provider':<16} {'median ms':>10} {'p20-p80':>8} {'/ SAM':>7} {'/ SGD':>7}")
        for name, t in timings.items():
            print(f"{name:<16} {t.median_ms:10.2f} {t.spread:8.1%} {t.median_ms / sam_ms:7.2f} {t.median_ms / sgd_ms:7.2f}")
            rows.append(dict(op="train_step", provider=name, size=size, metric="median_ms",
                             value=f"{t.median_ms:.4f}", device=dev))
            rows.append(dict(op="train_step", provider=name, size=size, metric="ratio_to_sam",
                             value=f"{t.median_ms / sam_ms:.4f}", device=dev))
    path = harness.append_rows(rows, harness.results_path(args.out, "esam_msam_cpu.csv"))
    print(f"\nrows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
