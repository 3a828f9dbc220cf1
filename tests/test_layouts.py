"""Parameters, gradients and state with different memory layouts (every backend, every dtype).

Autograd usually gives a gradient its parameter's strides, but nothing guarantees it (a gradient
assigned by hand, a transposed or channels-last parameter): element-wise results must not depend
on layout.
"""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases


def layouts(dtype, device, gen):
    """(param, grad, other) triples: transposed / channels-last params against contiguous tensors."""
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return [
        (r(9, 13).t(), r(13, 9), r(13, 9)),                                   # transposed param
        (r(13, 9), r(9, 13).t(), r(9, 13).t()),                               # transposed grad and state
        (r(4, 6, 5, 3).to(memory_format=torch.channels_last), r(4, 6, 5, 3), r(4, 6, 5, 3)),
        (r(4097), r(4097), r(4097)),                                          # plain, for company
    ]


@pytest.mark.parametrize("device,backend,dtype", backend_cases("perturb"))
def test_perturb_with_mixed_layouts(device, backend, dtype):
    gen = torch.Generator().manual_seed(0)
    params, grads, _ = map(list, zip(*layouts(dtype, device, gen)))
    originals = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    norm = ops.grad_norm(grads, backend="torch")
    ops.perturb_(params, grads, backups, norm, 0.3, backend=backend)
    n = norm.double().cpu()
    for p, o, g, b in zip(params, originals, grads, backups):
        assert torch.equal(b, o)
        assert_close_dtype(p, o.double().cpu() + 0.3 * g.double().cpu() / n, dtype)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore_sgd_step"))
def test_restore_sgd_step_with_mixed_layouts(device, backend, dtype):
    gen = torch.Generator().manual_seed(1)
    triples = layouts(dtype, device, gen)
    params = [p for p, _, _ in triples]
    grads = [g for _, g, _ in triples]
    bufs = [o.clone() for _, _, o in triples]
    backups = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in params]
    old_bufs = [b.clone() for b in bufs]
    ops.restore_sgd_step_(params, grads, backups, bufs, lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend)
    for p, g, bk, b, ob in zip(params, grads, backups, bufs, old_bufs):
        d = g.double().cpu() + 0.01 * bk.double().cpu()
        buf = 0.9 * ob.double().cpu() + d
        assert_close_dtype(b, buf, dtype, factor=4)
        assert_close_dtype(p, bk.double().cpu() - 0.1 * buf, dtype, factor=4)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore_adamw_step"))
def test_restore_adamw_step_with_mixed_layouts(device, backend, dtype):
    gen = torch.Generator().manual_seed(2)
    triples = layouts(dtype, device, gen)
    params = [p for p, _, _ in triples]
    grads = [g for _, g, _ in triples]
    ms = [torch.zeros_like(o) for _, _, o in triples]
    vs = [torch.zeros_like(o) for _, _, o in triples]
    backups = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    ops.restore_adamw_step_(params, grads, backups, ms, vs, [], steps, lr=0.1, weight_decay=0.0, backend=backend)
    for p, g, bk in zip(params, grads, backups):
        # First Adam step: m/sqrt(v) corrected = sign(g) (up to eps).
        g64 = g.double().cpu()
        expected = bk.double().cpu() - 0.1 * g64 / (g64.abs() + 1e-8)
        assert_close_dtype(p, expected, dtype, factor=4)
