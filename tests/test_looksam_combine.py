"""looksam_orthogonal_ / looksam_combine_: every backend against fp64 per-tensor references."""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, randn_list, shape_sets
from test_grad_dot import correlated_pair, reference_stats


def reference_orthogonal(sam_grads, first_grads, stats):
    """g_s - (<g, g_s>/||g||^2) g in fp64, the coefficient taken from ``stats``."""
    stats = stats.double().cpu()
    c = stats[0] / stats[1] if stats[1] > 0 else 0.0
    return [gs.double().cpu() - c * g.double().cpu() for gs, g in zip(sam_grads, first_grads)]


def reference_combine(grads, gv, sq_g, sq_gv, alpha):
    """g + alpha (||g|| / ||g_v||) g_v in fp64 (no change when ||g_v|| = 0)."""
    sq_g, sq_gv = float(sq_g), float(sq_gv)
    s = alpha * (sq_g / sq_gv) ** 0.5 if sq_gv > 0 else 0.0
    return [g.double().cpu() + s * v.double().cpu() for g, v in zip(grads, gv)]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("looksam_orthogonal"))
def test_looksam_orthogonal_matches_reference(device, backend, dtype, in_place):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), in_place)) % 2**31)
    for shapes in shape_sets(gen):
        first, sam = correlated_pair(shapes, dtype, device, gen, mix=0.9)
        stats = ops.grad_dot(first, sam, backend="torch")
        expected = reference_orthogonal(sam, first, stats)
        sam_before = [g.clone() for g in sam]
        gv = first if in_place else [torch.full_like(g, 7.0) for g in first]
        sq = ops.looksam_orthogonal_(gv, sam, first, stats, backend=backend)
        for v, e in zip(gv, expected):
            assert_close_dtype(v, e, dtype)
        assert sq.dtype == torch.float32 and sq.dim() == 0 and sq.device.type == device
        stored = sum((v.double().cpu() ** 2).sum() for v in gv)  # the norm of g_v *as stored*
        torch.testing.assert_close(sq.double().cpu(), stored, rtol=2e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(sam, sam_before)), "sam_grads must not change"


@pytest.mark.parametrize("device,backend,dtype", backend_cases("looksam_orthogonal", dtypes=[torch.float32]))
def test_looksam_orthogonal_is_orthogonal_to_g(device, backend, dtype):
    gen = torch.Generator().manual_seed(12)
    first, sam = correlated_pair([(4097,), (64, 9), (1,)], dtype, device, gen, mix=0.95)
    gv = [torch.empty_like(g) for g in first]
    sq = ops.looksam_orthogonal_(gv, sam, first, ops.grad_dot(first, sam), backend=backend)
    check = reference_stats(gv, first)
    assert abs(check[0]) < 1e-5 * (check[1] * check[2]).sqrt()
    # Pythagoras: ||g_s||^2 = ||g_v||^2 + (<g, g_s>/||g||)^2.
    s = reference_stats(first, sam)
    torch.testing.assert_close(sq.double().cpu(), s[2] - s[0] ** 2 / s[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("looksam_orthogonal"))
def test_looksam_orthogonal_with_zero_first_gradient(device, backend, dtype):
    gen = torch.Generator().manual_seed(2)
    sam = randn_list([(4097,), (3, 3)], dtype, device, gen)
    first = [torch.zeros_like(g) for g in sam]
    gv = [torch.empty_like(g) for g in sam]
    sq = ops.looksam_orthogonal_(gv, sam, first, ops.grad_dot(first, sam), backend=backend)
    assert all(torch.equal(v, g) for v, g in zip(gv, sam))
    assert torch.isfinite(sq)


@pytest.mark.parametrize("alpha", [0.7, 3.0])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("looksam_combine"))
def test_looksam_combine_matches_reference(device, backend, dtype, alpha):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), alpha)) % 2**31)
    for shapes in shape_sets(gen):
        grads = randn_list(shapes, dtype, device, gen, scale=1.5)
        gv = randn_list(shapes, dtype, device, gen, scale=0.2)
        sq_g = ops.grad_sq_norm(grads, backend="torch")
        sq_gv = ops.grad_sq_norm(gv, backend="torch") * 1.7  # any positive value: the stored one
        expected = reference_combine(grads, gv, sq_g, sq_gv, alpha)
        gv_before = [v.clone() for v in gv]
        ops.looksam_combine_(grads, gv, sq_g, sq_gv, alpha, backend=backend)
        for g, e in zip(grads, expected):
            assert_close_dtype(g, e, dtype)
        assert all(torch.equal(a, b) for a, b in zip(gv, gv_before)), "gv must not change"


@pytest.mark.parametrize("device,backend,dtype", backend_cases("looksam_combine", dtypes=[torch.float32]))
def test_looksam_combine_adds_exactly_alpha_norm_g(device, backend, dtype):
    """The added term has length alpha ||g|| whatever the scale of g_v."""
    gen = torch.Generator().manual_seed(21)
    grads = randn_list([(4097,), (20, 20)], dtype, device, gen)
    gv = randn_list([(4097,), (20, 20)], dtype, device, gen, scale=1e-3)
    before = [g.clone() for g in grads]
    sq_g, sq_gv = ops.grad_sq_norm(grads), ops.grad_sq_norm(gv)
    ops.looksam_combine_(grads, gv, sq_g, sq_gv, 0.7, backend=backend)
    added = ops.grad_norm([g - b for g, b in zip(grads, before)])
    torch.testing.assert_close(added, 0.7 * sq_g.sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("looksam_combine"))
def test_looksam_combine_edge_values(device, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    grads = randn_list([(4097,), (5, 3)], dtype, device, gen)
    gv = randn_list([(4097,), (5, 3)], dtype, device, gen)
    before = [g.clone() for g in grads]
    one, zero = torch.tensor(1.0, device=device), torch.tensor(0.0, device=device)
    cases = [(one, zero, 0.7),            # ||g_v|| = 0: nothing to add
             (one, one, 0.0),             # alpha = 0
             (torch.tensor(float("inf"), device=device), one, 0.7),   # non-finite ||g||: skip
             (one, torch.tensor(float("nan"), device=device), 0.7)]   # a stored g_v that overflowed: skip
    for sq_g, sq_gv, alpha in cases:
        ops.looksam_combine_(grads, gv, sq_g, sq_gv, alpha, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(grads, before)), (sq_g, sq_gv, alpha)


def test_looksam_ops_reject_bad_input_before_modifying():
    grads, gv = [torch.ones(3), torch.ones(2)], [torch.zeros(3), torch.zeros(2)]
    one = torch.tensor(1.0)
    for alpha in (-1.0, float("nan"), None):
        with pytest.raises(ValueError, match="alpha"):
            ops.looksam_combine_(grads, gv, one, one, alpha)
    with pytest.raises(ValueError, match="sq_norm_g"):
        ops.looksam_combine_(grads, gv, 1.0, one, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ops.looksam_combine_(grads, [torch.zeros(3), torch.zeros(3)], one, one, 0.5)
    stats = ops.grad_dot(grads, grads)
    with pytest.raises(ValueError, match="stats"):
        ops.looksam_orthogonal_(gv, grads, grads, stats[:1])
    with pytest.raises(ValueError, match="length"):
        ops.looksam_orthogonal_(gv, grads, grads[:1], stats)
    with pytest.raises(ValueError, match="at least one"):
        ops.looksam_orthogonal_([], [], [], stats)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in gv)
