"""bsam_noise_, bsam_ascent_, bsam_step_: the torch backend against fp64 per-tensor references."""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, randn_list, shape_sets

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def cases(op):
    return backend_cases(op, dtypes=DTYPES)


def positive(shapes, dtype, device, gen):
    return [(0.5 + torch.rand(s, generator=gen)).to(device=device, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("device,backend,dtype", cases("bsam_noise"))
def test_bsam_noise(device, backend, dtype):
    gen = torch.Generator().manual_seed(1)
    for shapes in shape_sets(gen):
        params = randn_list(shapes, dtype, device, gen)
        s = positive(shapes, dtype, device, gen)
        w0 = [p.clone() for p in params]
        backups = [torch.empty_like(p) for p in params]
        noise_gen = torch.Generator(device=device).manual_seed(5)
        ops.bsam_noise_(params, backups, s, 100, noise_gen, backend=backend)
        flat = torch.randn(sum(p.numel() for p in params), generator=torch.Generator(device=device).manual_seed(5),
                           device=device, dtype=torch.float32).double().cpu()
        start = 0
        for p, b, w, si in zip(params, backups, w0, s):
            n = flat[start:start + p.numel()].view(p.shape)
            start += p.numel()
            assert torch.equal(b, w)
            ref = w.double().cpu() + n / torch.sqrt(100 * si.double().cpu())
            assert_close_dtype(p, ref, dtype, factor=2)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("device,backend,dtype", cases("bsam_ascent"))
def test_bsam_ascent(device, backend, dtype, adaptive):
    gen = torch.Generator().manual_seed(2)
    for shapes in shape_sets(gen):
        params, backups, grads = (randn_list(shapes, dtype, device, gen) for _ in range(3))
        s = positive(shapes, dtype, device, gen)
        h = [torch.empty_like(p) for p in params]
        ops.bsam_ascent_(params, backups, grads, s, h, 0.3, adaptive, backend=backend)
        for p, hi, w, g, si in zip(params, h, backups, grads, s):
            w64, g64, s64 = w.double().cpu(), g.double().cpu(), si.double().cpu()
            d = w64 * w64 * g64 if adaptive else g64
            assert_close_dtype(p, w64 + 0.3 * d / s64, dtype, factor=2)
            assert_close_dtype(hi, torch.sqrt(s64 * g64 ** 2), dtype, factor=2)


@pytest.mark.parametrize("device,backend,dtype", cases("bsam_step"))
def test_bsam_step(device, backend, dtype):
    gen = torch.Generator().manual_seed(3)
    for lr in (0.1, torch.tensor(0.1)):
        for shapes in shape_sets(gen):
            params, backups, grads, m = (randn_list(shapes, dtype, device, gen) for _ in range(4))
            s, h = positive(shapes, dtype, device, gen), positive(shapes, dtype, device, gen)
            m0, s0 = [x.clone() for x in m], [x.clone() for x in s]
            ops.bsam_step_(params, backups, grads, m, s, h, lr=lr, beta1=0.9, beta2=0.99, weight_decay=1e-2,
                           damping=0.1, backend=backend)
            for p, mi, si, w, g, mo, so, hi in zip(params, m, s, backups, grads, m0, s0, h):
                w64, g64, m64, s64, h64 = (x.double().cpu() for x in (w, g, mo, so, hi))
                m_ref = 0.9 * m64 + 0.1 * (g64 + 1e-2 * w64)
                assert_close_dtype(mi, m_ref, dtype, factor=4)
                assert_close_dtype(p, w64 - float(lr) * m_ref / s64, dtype, factor=4)  # lr as stored
                assert_close_dtype(si, 0.99 * s64 + 0.01 * (h64 + 0.1 + 1e-2), dtype, factor=4)


def test_bsam_ops_validate_before_touching_anything():
    p, b, s = [torch.ones(3)], [torch.zeros(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match="num_data"):
        ops.bsam_noise_(p, b, s, 0, torch.Generator())
    with pytest.raises(ValueError, match="precisions"):
        ops.bsam_noise_(p, b, [torch.ones(2)], 10, torch.Generator())
    with pytest.raises(ValueError, match="rho"):
        ops.bsam_ascent_(p, b, p, s, b, -1.0)
    with pytest.raises(ValueError, match="scales"):
        ops.bsam_step_(p, b, p, b, s, [], lr=0.1, beta1=0.9, beta2=0.9, weight_decay=0.0, damping=0.1)
    assert torch.equal(p[0], torch.ones(3)) and torch.equal(b[0], torch.zeros(3))
