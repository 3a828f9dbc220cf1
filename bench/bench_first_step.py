"""``first_step``: global norm, back the weights up, ``w += rho * g / (||g|| + eps)``.

Traffic (DESIGN.md op table): norm reads g (4 bytes per fp32 value) + perturb reads w, g and writes
w, backup (16) = 20 bytes per value.

Providers: ``fastsam.SAM(...).first_step()`` per backend, the per-parameter baseline and
pytorch-optimizer's SAM (foreach off/on), all as optimizers over the same parameter set (so the
host-side cost of walking the parameter list counts, as it does in training); with ``--compile``
also fastsam's torch-backend ops and the plain foreach version under ``torch.compile``. Between
timed calls (untimed) every provider puts its weights back.

Run: ``python -m fastsam.bench.bench_first_step --set resnet18``.
"""

from __future__ import annotations

import torch

from . import harness, providers
from .baselines import foreach_first_step
from .harness import Instance
from .param_sets import PARAM_SETS, numel

OP = "first_step"
BYTES_PER_VALUE = 20


def builders(shapes, device: torch.device, compile_: bool = False) -> tuple[dict, list[str]]:
    from fastsam import ops

    seeds = iter(range(1000, 10 ** 6, 2))
    factories, notes = providers.optimizer_factories("sgd", device, providers.FIRST_STEP_OPS)
    out = {}
    for name, make_opt in factories.items():
        def make(make_opt=make_opt):
            opt = make_opt(providers.make_params(shapes, device, next(seeds)))
            return Instance(opt.first_step, lambda: providers.undo_first_step(opt))
        out[name] = make
    if compile_:
        def fastsam_ops(params, grads, backups):
            norm = ops.grad_norm(grads, backend="torch")
            ops.perturb_(params, grads, backups, norm, providers.RHO, backend="torch")

        for name, fn in (("fastsam-torch+compile", fastsam_ops),
                         ("foreach+compile", lambda w, g, b: foreach_first_step(w, g, b, providers.RHO))):
            def make(fn=fn):
                step = providers.compile_fn(fn, len(shapes))
                w = providers.make_tensors(shapes, device, next(seeds))
                g = providers.make_tensors(shapes, device, next(seeds), 1e-3)
                b = [torch.empty_like(t) for t in w]
                return Instance(lambda: step(w, g, b), lambda: torch._foreach_copy_(w, b))
            out[name] = make
    return out, notes


def measure(set_name: str, device: torch.device, *, budget_s: float | None = 20.0, compile_: bool = False,
            copy_gbs: float | None = None) -> tuple[list[dict], list[str]]:
    shapes = PARAM_SETS[set_name]()
    n = numel(shapes)
    made, notes = builders(shapes, device, compile_)
    rows, more = harness.measure_kernel(OP, harness.size_label(set_name, shapes), made, device,
                                        bytes_moved=BYTES_PER_VALUE * n, instance_bytes=12 * n,
                                        copy_gbs=copy_gbs, budget_s=budget_s)
    return rows, notes + more


def main(argv=None) -> int:
    return harness.kernel_main(__doc__, measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
