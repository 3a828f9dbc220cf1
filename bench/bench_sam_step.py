"""The optimizer side of one SAM step, ``first_step()`` + ``second_step()``, SGD or AdamW base.

Traffic per fp32 value (DESIGN.md op table): first step 20 bytes (norm 4, perturb 16) + second step
(SGD 20, AdamW 28) = 40 bytes with SGD, 48 with AdamW. The model's two forward/backward passes are
not included: this is the part fastsam's kernels replace (``bench_e2e`` measures the whole step).

Providers: ``fastsam.SAM`` per backend, the per-parameter baseline, pytorch-optimizer's SAM
(foreach off/on); with ``--compile`` also fastsam's torch-backend ops and the plain foreach version
under ``torch.compile`` (each half compiled on its own: see the note in ``builders``).

Run: ``python -m fastsam.bench.bench_sam_step --set resnet18 --base sgd``.
"""

from __future__ import annotations

import torch

from . import harness, providers
from .baselines import foreach_first_step
from .bench_second_step import STATE_LISTS, compiled_second_step, compiled_state
from .harness import Instance
from .param_sets import PARAM_SETS, numel

BYTES_PER_VALUE = {"sgd": 40, "adamw": 48}


def op_name(base: str) -> str:
    return f"sam_step_{base}"


def builders(shapes, device: torch.device, base: str, compile_: bool = False) -> tuple[dict, list[str]]:
    from fastsam import ops

    seeds = iter(range(1000, 10 ** 6, 2))
    needed = providers.FIRST_STEP_OPS + providers.SECOND_STEP_OPS[base]
    factories, notes = providers.optimizer_factories(base, device, needed)
    out = {}
    for name, make_opt in factories.items():
        def make(make_opt=make_opt):
            opt = make_opt(providers.make_params(shapes, device, next(seeds)))

            def sam_step():
                opt.first_step()
                opt.second_step()
            return Instance(sam_step)
        out[name] = make
    if compile_:
        second_fastsam, second_plain = compiled_second_step(base)

        def first_fastsam(w, g, b):
            ops.perturb_(w, g, b, ops.grad_norm(g, backend="torch"), providers.RHO, backend="torch")

        def first_plain(w, g, b):
            foreach_first_step(w, g, b, providers.RHO)

        # [note: two compiled halves] Each half is compiled on its own, as in training, where the
        # model's forward/backward runs between them. One graph over both would let inductor drop
        # the perturbation as a dead store (w + e is overwritten by the restore, never read).
        for name, first, second in (("fastsam-torch+compile", first_fastsam, second_fastsam),
                                    ("foreach+compile", first_plain, second_plain)):
            def make(first=first, second=second):
                first_c = providers.compile_fn(first, len(shapes))
                second_c = providers.compile_fn(second, len(shapes))
                w = providers.make_tensors(shapes, device, next(seeds))
                g = providers.make_tensors(shapes, device, next(seeds), 1e-3)
                b = [torch.empty_like(t) for t in w]
                state = compiled_state(base, w)

                def sam_step():
                    first_c(w, g, b)
                    second_c(w, g, b, state)
                return Instance(sam_step)
            out[name] = make
    return out, notes


def measure(set_name: str, device: torch.device, *, base: str = "sgd", budget_s: float | None = 20.0,
            compile_: bool = False, copy_gbs: float | None = None) -> tuple[list[dict], list[str]]:
    shapes = PARAM_SETS[set_name]()
    n = numel(shapes)
    made, notes = builders(shapes, device, base, compile_)
    rows, more = harness.measure_kernel(op_name(base), harness.size_label(set_name, shapes), made, device,
                                        bytes_moved=BYTES_PER_VALUE[base] * n,
                                        instance_bytes=4 * (3 + STATE_LISTS[base]) * n,
                                        copy_gbs=copy_gbs, budget_s=budget_s)
    return rows, notes + more


def main(argv=None) -> int:
    return harness.kernel_main(__doc__, measure, argv, choices={"base": tuple(BYTES_PER_VALUE)})


if __name__ == "__main__":
    raise SystemExit(main())
