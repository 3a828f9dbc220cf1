"""``second_step``: restore the weights and take the base optimizer's step (SGD or AdamW).

Traffic per fp32 value (DESIGN.md op table): SGD with momentum reads backup, g', buf and writes w,
buf = 20 bytes; AdamW reads backup, g', m, v and writes w, m, v = 28 bytes.

Providers: ``fastsam.SAM(..., base).second_step()`` per backend (the fused restore + step), the
per-parameter baseline (``p.data`` swap + the stock optimizer's default step) and
pytorch-optimizer's SAM (foreach off/on, the flag reaching the base optimizer too); with
``--compile`` also fastsam's torch-backend op and the plain foreach version under
``torch.compile``. Each timed call is preceded (untimed) by a ``first_step``.

Run: ``python -m fastsam.bench.bench_second_step --set resnet18 --base adamw``.
"""

from __future__ import annotations

import torch

from . import harness, providers
from .baselines import foreach_restore_adamw_step, foreach_restore_sgd_step
from .harness import Instance
from .param_sets import PARAM_SETS, numel

BYTES_PER_VALUE = {"sgd": 20, "adamw": 28}
STATE_LISTS = {"sgd": 1, "adamw": 2}  # momentum buffer; exp_avg and exp_avg_sq


def op_name(base: str) -> str:
    return f"second_step_{base}"


def compiled_second_step(base: str):
    """(fastsam torch-backend ops, plain foreach) restore + base step functions over tensor lists."""
    from fastsam import ops

    if base == "sgd":
        kw = providers.SGD_KW

        def fastsam_ops(w, g, b, state):
            ops.restore_sgd_step_(w, g, b, state[0], lr=kw["lr"], momentum=kw["momentum"],
                                  weight_decay=kw["weight_decay"], is_first_step=False, backend="torch")

        def plain(w, g, b, state):
            foreach_restore_sgd_step(w, g, b, state[0], kw["lr"], kw["momentum"], kw["weight_decay"])
        return fastsam_ops, plain
    kw = providers.ADAMW_KW
    beta1, beta2 = kw["betas"]

    def fastsam_ops(w, g, b, state):
        ops.restore_adamw_step_(w, g, b, state[0], state[1], [], state[2], lr=kw["lr"], beta1=beta1, beta2=beta2,
                                eps=kw["eps"], weight_decay=kw["weight_decay"], backend="torch")

    def plain(w, g, b, state):
        foreach_restore_adamw_step(w, g, b, state[0], state[1], state[3], kw["lr"], beta1, beta2, kw["eps"],
                                   kw["weight_decay"])
    return fastsam_ops, plain


def compiled_state(base: str, w: list[torch.Tensor]) -> list:
    if base == "sgd":
        return [[torch.zeros_like(t) for t in w]]
    steps = [torch.zeros((), device=t.device) for t in w]
    return [[torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w], steps,
            torch.zeros((), device=w[0].device)]


def builders(shapes, device: torch.device, base: str, compile_: bool = False) -> tuple[dict, list[str]]:
    seeds = iter(range(1000, 10 ** 6, 2))
    factories, notes = providers.optimizer_factories(base, device, providers.SECOND_STEP_OPS[base])
    out = {}
    for name, make_opt in factories.items():
        def make(make_opt=make_opt):
            opt = make_opt(providers.make_params(shapes, device, next(seeds)))
            opt.first_step()
            return Instance(opt.second_step, opt.first_step)
        out[name] = make
    if compile_:
        for name, fn in zip(("fastsam-torch+compile", "foreach+compile"), compiled_second_step(base)):
            def make(fn=fn):
                step = providers.compile_fn(fn, len(shapes))
                w = providers.make_tensors(shapes, device, next(seeds))
                g = providers.make_tensors(shapes, device, next(seeds), 1e-3)
                b = [t.clone() for t in w]
                state = compiled_state(base, w)
                # The backups stay fixed: restoring from them moves the same bytes every call.
                return Instance(lambda: step(w, g, b, state))
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
