"""gsam_combine_: every backend against an fp64 per-tensor reference; the non-finite skip."""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, shape_sets
from test_grad_dot import correlated_pair, reference_stats


def reference_gsam(grads, first_grads, stats, alpha):
    """g_p - alpha * (g - c g_p) in fp64, c = <g, g_p> / ||g_p||^2 taken from ``stats``."""
    stats = stats.double().cpu()
    c = stats[0] / stats[2] if stats[2] > 0 else 0.0
    out = []
    for gp, g in zip(grads, first_grads):
        gp, g = gp.double().cpu(), g.double().cpu()
        out.append(gp - alpha * (g - c * gp))
    return out


@pytest.mark.parametrize("alpha", [0.4, 2.5])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("gsam_combine"))
def test_gsam_combine_matches_reference(device, backend, dtype, alpha):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), alpha)) % 2**31)
    for shapes in shape_sets(gen):
        first, grads = correlated_pair(shapes, dtype, device, gen, mix=0.9)
        stats = ops.grad_dot(first, grads, backend="torch")
        expected = reference_gsam(grads, first, stats, alpha)
        firsts_before = [g.clone() for g in first]
        ptrs = [g.data_ptr() for g in grads]
        ops.gsam_combine_(grads, first, stats, alpha, backend=backend)
        for g, e, ptr in zip(grads, expected, ptrs):
            assert g.data_ptr() == ptr
            assert_close_dtype(g, e, dtype)
        assert all(torch.equal(a, b) for a, b in zip(first, firsts_before)), "first_grads must not change"


@pytest.mark.parametrize("device,backend,dtype", backend_cases("gsam_combine", dtypes=[torch.float32]))
def test_gsam_direction_is_descent_plus_orthogonal(device, backend, dtype):
    """The change made to g_p is -alpha * g_perp, and g_perp is orthogonal to g_p."""
    gen = torch.Generator().manual_seed(9)
    first, grads = correlated_pair([(4097,), (30, 11), (1,)], dtype, device, gen, mix=0.7)
    before = [g.clone() for g in grads]
    stats = ops.grad_dot(first, grads, backend=backend)
    ops.gsam_combine_(grads, first, stats, 0.5, backend=backend)
    g_perp = [(b - g) / 0.5 for g, b in zip(grads, before)]
    dot = ops.grad_dot(g_perp, before)
    assert abs(dot[0].item()) < 1e-5 * (dot[1] * dot[2]).sqrt().item()


@pytest.mark.parametrize("device,backend,dtype", backend_cases("gsam_combine"))
def test_gsam_combine_edge_values(device, backend, dtype):
    gen = torch.Generator().manual_seed(4)
    first, grads = correlated_pair([(4097,), (5, 3)], dtype, device, gen)
    # alpha = 0: the gradients stay bit for bit.
    stats = ops.grad_dot(first, grads)
    before = [g.clone() for g in grads]
    ops.gsam_combine_(grads, first, stats, 0.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    # g_p = 0: there is nothing to project on, g_perp = g and the result is -alpha g.
    zeros = [torch.zeros_like(g) for g in grads]
    ops.gsam_combine_(zeros, first, ops.grad_dot(first, zeros), 0.3, backend=backend)
    for z, g in zip(zeros, first):
        assert_close_dtype(z, -0.3 * g.double(), dtype)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("gsam_combine"))
def test_gsam_combine_skips_on_non_finite_stats(device, backend, dtype, bad):
    gen = torch.Generator().manual_seed(6)
    first, grads = correlated_pair([(4097,), (5, 3)], dtype, device, gen)
    first[0][11] = bad  # an overflow in the first pass
    stats = ops.grad_dot(first, grads)
    assert not torch.isfinite(stats).all()
    before = [g.clone() for g in grads]
    ops.gsam_combine_(grads, first, stats, 0.4, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    # And in the second pass: g_p's own inf/NaN stay where they were, nothing else changes.
    first, grads = correlated_pair([(4097,), (5, 3)], dtype, device, gen)
    grads[1][2, 1] = bad
    before = [g.clone() for g in grads]
    ops.gsam_combine_(grads, first, ops.grad_dot(first, grads), 0.4, backend=backend)
    for a, b in zip(grads, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_gsam_combine_rejects_bad_input_before_modifying():
    grads, first = [torch.ones(3), torch.ones(2)], [torch.zeros(3), torch.zeros(2)]
    stats = ops.grad_dot(first, grads)
    for alpha in (-0.1, float("nan"), float("inf"), "0.4", True):
        with pytest.raises(ValueError, match="alpha"):
            ops.gsam_combine_(grads, first, stats, alpha)
    with pytest.raises(ValueError, match="stats"):
        ops.gsam_combine_(grads, first, stats[:2], 0.4)
    with pytest.raises(ValueError, match="stats"):
        ops.gsam_combine_(grads, first, 1.0, 0.4)
    with pytest.raises(ValueError, match="length"):
        ops.gsam_combine_(grads, first[:1], stats, 0.4)
    with pytest.raises(ValueError, match="shape"):
        ops.gsam_combine_(grads, [torch.zeros(3), torch.zeros(5)], stats, 0.4)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


def test_gsam_combine_mixed_buckets_share_one_coefficient():
    """c is global: the fp32 and bf16 buckets use the same stats."""
    gen = torch.Generator().manual_seed(8)
    f32, g32 = correlated_pair([(100,), (7, 3)], torch.float32, "cpu", gen)
    f16, g16 = correlated_pair([(50,)], torch.bfloat16, "cpu", gen)
    first, grads = f32 + f16, g32 + g16
    stats = ops.grad_dot(first, grads)
    torch.testing.assert_close(stats.double(), reference_stats(first, grads), rtol=2e-5, atol=1e-5)
    expected = reference_gsam(grads, first, stats, 0.4)
    ops.gsam_combine_(grads, first, stats, 0.4)
    for g, e in zip(grads, expected):
        assert_close_dtype(g, e, g.dtype)
