"""ema_direction_: every backend against an fp64 per-tensor reference, the first-step form, skip, bad input."""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, randn_list, shape_sets

CASES = backend_cases("ema_direction") + [pytest.param("cpu", "torch", torch.float64, id="cpu-torch-float64")]


def reference_ema_direction(grads, momenta, sigma, lmbda):
    """fp64, tensor by tensor, from the paper: (d, new m)."""
    ds, ms = [], []
    for g, m in zip(grads, momenta):
        g64, m64 = g.double().cpu(), m.double().cpu()
        ds.append(g64 - sigma * m64)
        ms.append(lmbda * m64 + (1 - lmbda) * g64)
    return ds, ms


@pytest.mark.parametrize("device,backend,dtype", CASES)
def test_ema_direction_matches_reference(device, backend, dtype):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), "ema")) % 2 ** 31)
    for shapes in shape_sets(gen):
        grads = randn_list(shapes, dtype, device, gen)
        momenta = randn_list(shapes, dtype, device, gen, scale=0.7)
        g0, m0 = [g.clone() for g in grads], [m.clone() for m in momenta]
        ops.ema_direction_(grads, momenta, 1.0, 0.9, backend=backend)
        ref_d, ref_m = reference_ema_direction(g0, m0, 1.0, 0.9)
        for g, m, rd, rm in zip(grads, momenta, ref_d, ref_m):
            assert_close_dtype(g, rd, dtype, factor=2)
            assert_close_dtype(m, rm, dtype, factor=2)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("ema_direction"))
def test_sigma_and_lmbda_zero_from_a_zero_ema_copy_the_gradient(device, backend, dtype):
    gen = torch.Generator().manual_seed(8)
    shapes = [(4097,), (7, 3)]
    grads = randn_list(shapes, dtype, device, gen)
    g0 = [g.clone() for g in grads]
    momenta = [torch.zeros_like(g) for g in grads]
    ops.ema_direction_(grads, momenta, 0.0, 0.0, backend=backend)
    assert all(torch.equal(g, x) for g, x in zip(grads, g0))
    assert all(torch.equal(m, x) for m, x in zip(momenta, g0))


@pytest.mark.parametrize("device,backend,dtype", backend_cases("ema_direction"))
def test_skip_flag_keeps_the_ema_clean(device, backend, dtype):
    gen = torch.Generator().manual_seed(9)
    shapes = [(4097,), (7, 3)]
    grads, momenta = randn_list(shapes, dtype, device, gen), randn_list(shapes, dtype, device, gen)
    grads[0][3] = float("inf")
    g0, m0 = [g.clone() for g in grads], [m.clone() for m in momenta]
    ops.ema_direction_(grads, momenta, 1.0, 0.9, skip=torch.tensor(1.0, device=device), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads + momenta, g0 + m0))
    assert all(torch.isfinite(m).all() for m in momenta)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("ema_direction", dtypes=[torch.float32]))
def test_ema_direction_non_contiguous(device, backend, dtype):
    gen = torch.Generator().manual_seed(10)
    grads = [torch.randn(40, 30, generator=gen).t(), torch.randn(5, generator=gen)]
    momenta = [torch.randn(g.shape, generator=gen) for g in grads]
    g0, m0 = [g.clone() for g in grads], [m.clone() for m in momenta]
    ops.ema_direction_(grads, momenta, 0.5, 0.8, backend=backend)
    ref_d, ref_m = reference_ema_direction(g0, m0, 0.5, 0.8)
    for g, m, rd, rm in zip(grads, momenta, ref_d, ref_m):
        assert_close_dtype(g, rd, dtype)
        assert_close_dtype(m, rm, dtype)


def test_ema_direction_validates_before_touching_anything():
    g, m = [torch.ones(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match="sigma"):
        ops.ema_direction_(g, m, -1.0, 0.9)
    with pytest.raises(ValueError, match="lmbda"):
        ops.ema_direction_(g, m, 1.0, 1.5)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        ops.ema_direction_(g, [], 1.0, 0.9)
    with pytest.raises(ValueError, match="does not match"):
        ops.ema_direction_(g, [torch.ones(3, dtype=torch.float64)], 1.0, 0.9)
    assert torch.equal(g[0], torch.ones(3)) and torch.equal(m[0], torch.ones(3))
