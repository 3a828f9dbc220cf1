"""grad_dot: every backend against an fp64 per-tensor reference."""

import pytest
import torch

from fastsam import ops
from fastsam.ops.grad_dot import DOT, SQ_NORM_A, SQ_NORM_B
from helpers import backend_cases, randn_list, shape_sets


def reference_stats(a, b):
    """(<a, b>, ||a||^2, ||b||^2) in fp64, one tensor at a time."""
    dot = sq_a = sq_b = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        x, y = x.double().cpu(), y.double().cpu()
        dot = dot + (x * y).sum()
        sq_a = sq_a + (x * x).sum()
        sq_b = sq_b + (y * y).sum()
    return torch.stack([dot, sq_a, sq_b])


def correlated_pair(shapes, dtype, device, gen, mix=0.8):
    """Two gradient-like lists: b = mix * a + noise, as the gradients at w and w + e are."""
    a = randn_list(shapes, torch.float32, "cpu", gen, scale=1.3)
    noise = randn_list(shapes, torch.float32, "cpu", gen, scale=0.5)
    b = [mix * x + n for x, n in zip(a, noise)]
    return [x.to(device=device, dtype=dtype) for x in a], [y.to(device=device, dtype=dtype) for y in b]


def assert_stats_close(stats, ref, msg=""):
    """fp32 accumulation: norms to 2e-5 relative; the dot to 2e-5 of ||a||^2 + ||b||^2 (its scale)."""
    stats = stats.double().cpu()
    torch.testing.assert_close(stats[1:], ref[1:], rtol=2e-5, atol=1e-6, msg=msg or None)
    assert abs(stats[DOT] - ref[DOT]) <= 2e-5 * (ref[SQ_NORM_A] + ref[SQ_NORM_B]) + 1e-6, (msg, stats, ref)


@pytest.mark.parametrize("mix", [0.8, 0.0, -0.5])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_dot"))
def test_grad_dot_matches_reference(device, backend, dtype, mix):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), mix)) % 2**31)
    for shapes in shape_sets(gen):
        a, b = correlated_pair(shapes, dtype, device, gen, mix)
        stats = ops.grad_dot(a, b, backend=backend)
        assert stats.dtype == torch.float32 and stats.shape == (3,) and stats.device.type == device
        assert_stats_close(stats, reference_stats(a, b), f"{len(shapes)} tensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grad_dot_multi_tensor_path_on_cpu(monkeypatch, dtype):
    """The torch backend's GPU path (multi-tensor norms, polarisation), forced on the CPU.

    Sizes stay below the range where torch's CPU fp32 norm kernel loses accuracy (see the note on
    ``reduces_per_tensor``); on a GPU the same path is tested at every size by the tests above.
    """
    import sys

    grad_dot_module = sys.modules["fastsam.ops.grad_dot"]  # the attribute fastsam.ops.grad_dot is the op
    monkeypatch.setattr(grad_dot_module, "reduces_per_tensor", lambda device: False)
    gen = torch.Generator().manual_seed(17)
    for shapes in ([(4097,)], [(1,)], [(3, 5)] * 7 + [(1000,), (64, 3, 3)]):
        for mix in (0.8, -0.3):
            a, b = correlated_pair(shapes, dtype, "cpu", gen, mix)
            assert_stats_close(ops.grad_dot(a, b, backend="torch"), reference_stats(a, b))
            sq = grad_dot_module.sum_sq_norms(a)
            torch.testing.assert_close(sq.double(), reference_stats(a, a)[SQ_NORM_A], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_dot"))
def test_grad_dot_special_pairs(device, backend, dtype):
    """a with itself: dot = both norms; a with -a: dot = -||a||^2; a with zeros: dot = 0."""
    gen = torch.Generator().manual_seed(3)
    a = randn_list([(4097,), (17, 3), (1,)], dtype, device, gen)
    ref = reference_stats(a, a)[SQ_NORM_A]
    for other, expected in ((a, ref), ([-x for x in a], -ref), ([torch.zeros_like(x) for x in a], 0.0)):
        stats = ops.grad_dot(a, other, backend=backend).double().cpu()
        assert abs(stats[DOT] - expected) <= 1e-5 * ref
        torch.testing.assert_close(stats[SQ_NORM_A], ref, rtol=2e-5, atol=0)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_dot"))
def test_grad_dot_is_deterministic(device, backend, dtype):
    gen = torch.Generator().manual_seed(7)
    a, b = correlated_pair([(278011,), (33, 7), (5,)], dtype, device, gen)
    first = ops.grad_dot(a, b, backend=backend)
    for _ in range(3):
        assert torch.equal(ops.grad_dot(a, b, backend=backend), first)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_dot", dtypes=[torch.float32]))
def test_grad_dot_propagates_non_finite(device, backend, dtype):
    for bad in (float("inf"), float("nan")):
        for which in (0, 1):
            pair = [[torch.ones(10, device=device), torch.ones(4097, device=device)] for _ in range(2)]
            pair[which][1][4000] = bad
            stats = ops.grad_dot(*pair, backend=backend)
            assert not torch.isfinite(stats).all()
            assert not torch.isfinite(stats[SQ_NORM_A if which == 0 else SQ_NORM_B])


def test_grad_dot_fp64_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(5)
    a, b = correlated_pair([(100,), (7, 3)], torch.float32, "cpu", gen)
    a16, b16 = correlated_pair([(50,)], torch.bfloat16, "cpu", gen)
    a64, b64 = correlated_pair([(9, 9)], torch.float64, "cpu", gen)
    stats = ops.grad_dot(a + a16 + a64, b + b16 + b64)
    assert stats.dtype == torch.float32
    assert_stats_close(stats, reference_stats(a + a16 + a64, b + b16 + b64))


def test_grad_dot_rejects_bad_input():
    x = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match="length"):
        ops.grad_dot(x, x[:1])
    with pytest.raises(ValueError, match="shape"):
        ops.grad_dot(x, [torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="dtype"):
        ops.grad_dot(x, [torch.zeros(3), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one"):
        ops.grad_dot([], [])
