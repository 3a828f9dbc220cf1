"""perturb_: every backend against an fp64 per-tensor reference; SWP masks; non-finite skip."""

import pytest
import torch

from fastsam import ops
from fastsam.ops import _philox
from helpers import assert_close_dtype, backend_cases, randn_list, shape_sets
from test_grad_norm import reference_sq_norm


def reference_perturb(params, grads, norm, rho, mode, eta, eps, beta=1.0, seed=0, offset=0):
    """fp64 reference of w + e, per tensor; the SWP mask comes from the counter generator."""
    scale = rho / (norm + eps)
    out, start = [], offset
    for w, g in zip(params, grads):
        w64, g64 = w.double().cpu(), g.double().cpu()
        if mode == "plain":
            d = g64
        elif mode == "adaptive":
            d = (w64.abs() + eta) ** 2 * g64
        else:
            d = g64 / (1 + eta * g64 * g64)
        if beta < 1:
            keep = _philox.keep_mask(seed, start, w.numel(), beta, torch.device("cpu")).view(w.shape)
            d = torch.where(keep, d / beta, torch.zeros_like(d))
        start += w.numel()
        out.append(w64 + scale * d)
    return out


@pytest.mark.parametrize("mode,eta", [("plain", 0.0), ("adaptive", 0.01), ("fisher", 1.0)])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("perturb"))
def test_perturb_matches_reference(device, backend, dtype, mode, eta):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), mode)) % 2**31)
    rho, eps = 0.37, 1e-12
    for shapes in shape_sets(gen):
        params = randn_list(shapes, dtype, device, gen)
        grads = randn_list(shapes, dtype, device, gen, scale=0.5)
        originals = [p.clone() for p in params]
        backups = [torch.empty_like(p) for p in params]
        norm = ops.grad_norm(grads, params, mode=mode, eta=eta, backend="torch")
        ops.perturb_(params, grads, backups, norm, rho, mode=mode, eta=eta, eps=eps, backend=backend)
        ref = reference_perturb(originals, grads, reference_sq_norm(grads, originals, mode, eta).sqrt(),
                                rho, mode, eta, eps)
        for p, b, o, r in zip(params, backups, originals, ref):
            assert torch.equal(b, o), "the backup must be an exact copy of the weights"
            assert_close_dtype(p, r, dtype)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("perturb", dtypes=[torch.float32]))
def test_perturbation_has_length_rho(device, backend, dtype):
    """SAM's e has norm rho exactly (up to rounding), whatever the number of tensors."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(64, 3, 3, 3), (64,), (1000, 10), (10,)]
    params = randn_list(shapes, dtype, device, gen)
    grads = randn_list(shapes, dtype, device, gen)
    originals = [p.clone() for p in params]
    norm = ops.grad_norm(grads, backend=backend)
    ops.perturb_(params, grads, [torch.empty_like(p) for p in params], norm, 0.05, backend=backend)
    e = torch.cat([(p - o).double().flatten().cpu() for p, o in zip(params, originals)])
    assert abs(e.norm().item() - 0.05) < 1e-6


@pytest.mark.parametrize("beta", [0.5, 0.1])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("perturb"))
def test_swp_masked_perturbation(device, backend, dtype, beta):
    gen = torch.Generator().manual_seed(5)
    shapes = [(4097,), (300, 7), (1,)]
    params = randn_list(shapes, dtype, device, gen)
    grads = randn_list(shapes, dtype, device, gen)
    originals = [p.clone() for p in params]
    norm = ops.grad_norm(grads, backend="torch")
    seed, offset = 123456789, 1000
    ops.perturb_(params, grads, [torch.empty_like(p) for p in params], norm, 0.2, beta=beta, seed=seed,
                 offset=offset, backend=backend)
    ref = reference_perturb(originals, grads, reference_sq_norm(grads, None, "plain", 0).sqrt(), 0.2, "plain",
                            0.0, 1e-12, beta=beta, seed=seed, offset=offset)
    for p, r in zip(params, ref):
        assert_close_dtype(p, r, dtype)
    if dtype == torch.float32:
        changed = torch.cat([(p != o).flatten().cpu() for p, o in zip(params, originals)])
        n = changed.numel()
        rate = changed.double().mean().item()
        # Binomial(n, beta): 5 standard deviations.
        assert abs(rate - beta) < 5 * (beta * (1 - beta) / n) ** 0.5


def test_swp_mask_is_reproducible_and_seed_dependent():
    a = _philox.keep_mask(42, 0, 10000, 0.5, torch.device("cpu"))
    b = _philox.keep_mask(42, 0, 10000, 0.5, torch.device("cpu"))
    c = _philox.keep_mask(43, 0, 10000, 0.5, torch.device("cpu"))
    shifted = _philox.keep_mask(42, 5000, 5000, 0.5, torch.device("cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[5000:], shifted), "a counter offset must continue the same stream"


def _philox_python(seed, counter, rounds=10):
    """Philox-4x32 written out with Python ints, independent of the torch implementation."""
    m = 0xFFFFFFFF
    c = [counter & m, (counter >> 32) & m, 0, 0]
    k = [seed & m, (seed >> 32) & m]
    for _ in range(rounds):
        hi_b, lo_b = divmod(0xCD9E8D57 * c[2], 1 << 32)
        hi_a, lo_a = divmod(0xD2511F53 * c[0], 1 << 32)
        c = [hi_b ^ c[1] ^ k[0], lo_b, hi_a ^ c[3] ^ k[1], lo_a]
        k = [(k[0] + 0x9E3779B9) & m, (k[1] + 0xBB67AE85) & m]
    return c[0]


def test_philox_matches_independent_python_version():
    seeds = [0, 1, 2**32 + 5, 987654321987]
    counters = [0, 1, 77, 2**31 + 3, 2**33 + 9]
    for seed in seeds:
        got = _philox.philox_uint32(seed, torch.tensor(counters, dtype=torch.int64)).tolist()
        assert got == [_philox_python(seed, c) for c in counters]


def test_philox_uniforms_are_uniform():
    u = _philox.uniform(2024, torch.arange(200000))
    assert u.min() >= 0 and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1)
    expected = 20000
    chi2 = (((hist - expected) ** 2) / expected).sum().item()
    assert chi2 < 40, f"chi-square {chi2} over 9 degrees of freedom"


@pytest.mark.parametrize("device,backend,dtype", backend_cases("perturb"))
def test_non_finite_norm_leaves_weights_untouched(device, backend, dtype):
    gen = torch.Generator().manual_seed(1)
    shapes = [(4097,), (3, 5)]
    for bad in (float("inf"), float("nan")):
        params = randn_list(shapes, dtype, device, gen)
        grads = randn_list(shapes, dtype, device, gen)
        grads[0][17] = bad
        originals = [p.clone() for p in params]
        backups = [torch.zeros_like(p) for p in params]
        norm = ops.grad_norm(grads, backend="torch")
        assert not torch.isfinite(norm)
        ops.perturb_(params, grads, backups, norm, 0.05, backend=backend)
        for p, b, o in zip(params, backups, originals):
            assert torch.equal(p, o)
            assert torch.equal(b, o)


def test_perturb_validates_arguments():
    p, g, b = [torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)]
    n = torch.tensor(1.0)
    with pytest.raises(ValueError, match="rho"):
        ops.perturb_(p, g, b, n, -0.1)
    with pytest.raises(ValueError, match="rho"):
        ops.perturb_(p, g, b, n, float("nan"))
    with pytest.raises(ValueError, match="beta"):
        ops.perturb_(p, g, b, n, 0.1, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        ops.perturb_(p, g, b, n, 0.1, beta=1.5)
    with pytest.raises(ValueError, match="shape"):
        ops.perturb_(p, [torch.ones(4)], b, n, 0.1)
    with pytest.raises(ValueError, match="length"):
        ops.perturb_(p, g, [], n, 0.1)
    assert torch.equal(p[0], torch.zeros(3)), "a rejected call must not modify anything"
