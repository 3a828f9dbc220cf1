"""Global gradient norm ``||g||`` over a parameter set, per provider.

Traffic (DESIGN.md op table): the gradient is read once, 4 bytes per fp32 value.

Providers: ``fastsam-<backend>`` (:func:`fastsam.ops.grad_norm`), ``fastsam-torch+compile``,
``foreach+compile``, the per-parameter baseline (one norm per tensor, stacked, normed again) and
pytorch-optimizer's ``get_global_gradient_norm`` (which the peer's SAM uses; it has no foreach switch).

Run: ``python -m fastsam.bench.bench_grad_norm --set resnet18 --set small2000``.
"""

from __future__ import annotations

import torch

from . import harness, providers
from .baselines import foreach_grad_norm, per_param_grad_norm
from .harness import Instance
from .param_sets import PARAM_SETS, numel

OP = "grad_norm"
BYTES_PER_VALUE = 4


def builders(shapes, device: torch.device, compile_: bool = False) -> tuple[dict, list[str]]:
    from fastsam import ops

    seeds = iter(range(1000, 10 ** 6))
    grads = lambda: providers.make_tensors(shapes, device, next(seeds), 1e-3)  # noqa: E731
    out, notes = {}, []
    for backend in providers.fastsam_backends((OP,), device):
        def make(b=backend):
            g = grads()
            return Instance(lambda: ops.grad_norm(g, backend=b))
        out[f"fastsam-{backend}"] = make
    if compile_:
        def make_compiled_fastsam():
            fn = providers.compile_fn(lambda gs: ops.grad_norm(gs, backend="torch"), len(shapes))
            g = grads()
            return Instance(lambda: fn(g))

        def make_compiled_foreach():
            fn = providers.compile_fn(foreach_grad_norm, len(shapes))
            g = grads()
            return Instance(lambda: fn(g))
        out["fastsam-torch+compile"] = make_compiled_fastsam
        out["foreach+compile"] = make_compiled_foreach

    def make_baseline():
        g = grads()
        return Instance(lambda: per_param_grad_norm(g))
    out[harness.BASELINE] = make_baseline
    peer, why = providers.peer_sam()
    if peer is None:
        notes.append(why)
    else:
        from pytorch_optimizer.optimizer.utils import get_global_gradient_norm

        def make_peer():
            params = providers.make_params(shapes, device, next(seeds))
            groups = [{"params": params}]
            return Instance(lambda: get_global_gradient_norm(groups).sqrt())
        # The peer's SAM computes its norm this way whatever its foreach flag: one provider for both.
        out["peer"] = make_peer
    return out, notes


def measure(set_name: str, device: torch.device, *, budget_s: float | None = 20.0, compile_: bool = False,
            copy_gbs: float | None = None) -> tuple[list[dict], list[str]]:
    shapes = PARAM_SETS[set_name]()
    n = numel(shapes)
    made, notes = builders(shapes, device, compile_)
    rows, more = harness.measure_kernel(OP, harness.size_label(set_name, shapes), made, device,
                                        bytes_moved=BYTES_PER_VALUE * n, instance_bytes=BYTES_PER_VALUE * n,
                                        copy_gbs=copy_gbs, budget_s=budget_s)
    return rows, notes + more


def main(argv=None) -> int:
    return harness.kernel_main(__doc__, measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
