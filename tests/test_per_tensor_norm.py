"""per_tensor_norm and perturb_per_tensor_ (the layer-wise ops of AWP / WT-AWP / HERO).

Every backend against an fp64 per-tensor reference: odd sizes, many tensors, each dtype; the CUDA
kernels' code through the host emulation (skipped without nvcc); the Triton kernels under the
interpreter; a constant number of launches / dispatched ops whatever the number of tensors.
"""

import pytest
import torch

from fastsam import ops
from helpers import DTYPES, assert_close_dtype, backend_cases, op_counter, randn_list, shape_sets


def reference_norms(tensors):
    return torch.stack([t.double().cpu().pow(2).sum() for t in tensors]).sqrt()


def reference_perturb(params, grads, scales):
    """fp64: w + s_t g_t, or w itself where s_t is not finite."""
    out = []
    for w, g, s in zip(params, grads, scales.double().cpu()):
        w64 = w.double().cpu()
        out.append(w64 + s * g.double().cpu() if torch.isfinite(s) else w64)
    return out


# ------------------------------------------------------------------------------------------------
# per_tensor_norm

@pytest.mark.parametrize("device,backend,dtype", backend_cases("per_tensor_norm", DTYPES + [torch.float64]))
def test_per_tensor_norm_matches_reference(device, backend, dtype):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype))) % 2**31)
    for shapes in shape_sets(gen):
        xs = randn_list(shapes, dtype, device, gen, scale=1.3)
        norms = ops.per_tensor_norm(xs, backend=backend)
        expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert norms.dtype == expected_dtype and norms.shape == (len(xs),) and norms.device.type == device
        # fp32 accumulation over up to 278011 terms: relative error well below 1e-5 (inputs are exact);
        # fp64 buckets are reduced in fp64.
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(norms.double().cpu(), reference_norms(xs), **tol)
        sq = ops.per_tensor_sq_norms(xs, backend=backend)
        torch.testing.assert_close(sq.double().cpu(), reference_norms(xs) ** 2,
                                   **(tol if dtype == torch.float64 else dict(rtol=4e-5, atol=1e-6)))


@pytest.mark.parametrize("device,backend,dtype", backend_cases("per_tensor_norm", [torch.float32]))
def test_per_tensor_norm_is_deterministic_and_layout_blind(device, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    xs = randn_list([(278011,), (33, 7), (5,)], dtype, device, gen)
    first = ops.per_tensor_norm(xs, backend=backend)
    assert all(torch.equal(ops.per_tensor_norm(xs, backend=backend), first) for _ in range(2))
    # A transposed matrix and a channels_last tensor have the norms of their contiguous copies.
    odd = [torch.randn(40, 30, generator=gen).t().to(device), torch.randn(2, 3, 4, 5, generator=gen).to(device)
           .to(memory_format=torch.channels_last), torch.randn(9, 8, generator=gen)[:, ::2].to(device)]
    torch.testing.assert_close(ops.per_tensor_norm(odd, backend=backend).double().cpu(), reference_norms(odd),
                               rtol=2e-5, atol=1e-6)


def test_per_tensor_norm_mixed_buckets_empty_tensors_and_errors():
    gen = torch.Generator().manual_seed(3)
    xs = (randn_list([(100,), (7, 3)], torch.float32, "cpu", gen) + [torch.empty(0)]
          + randn_list([(50,)], torch.bfloat16, "cpu", gen) + randn_list([(4, 4)], torch.float64, "cpu", gen))
    norms = ops.per_tensor_norm(xs, backend="torch")
    assert norms.shape == (5,) and norms[2] == 0 and norms.dtype == torch.float32  # mixed: fp32
    fp64 = randn_list([(3,), (4097,)], torch.float64, "cpu", gen)
    assert ops.per_tensor_norm(fp64 + [torch.empty(0, dtype=torch.float64)]).dtype == torch.float64
    torch.testing.assert_close(norms.double(), reference_norms(xs), rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        ops.per_tensor_norm([])
    with pytest.raises(TypeError, match="floating-point"):
        ops.per_tensor_norm([torch.ones(3, dtype=torch.int64)])


@pytest.mark.parametrize("device,backend,dtype", backend_cases("per_tensor_norm", [torch.float32]))
def test_per_tensor_norm_propagates_non_finite_per_tensor(device, backend, dtype):
    xs = [torch.ones(10, device=device), torch.ones(4097, device=device), torch.ones(3, device=device)]
    xs[1][4000] = float("inf")
    xs[2][1] = float("nan")
    norms = ops.per_tensor_norm(xs, backend=backend).cpu()
    assert norms[0] == 10 ** 0.5 and norms[1] == float("inf") and torch.isnan(norms[2])


# ------------------------------------------------------------------------------------------------
# perturb_per_tensor_

@pytest.mark.parametrize("device,backend,dtype", backend_cases("perturb_per_tensor", DTYPES + [torch.float64]))
def test_perturb_per_tensor_matches_reference(device, backend, dtype):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), "p")) % 2**31)
    for shapes in shape_sets(gen):
        params = randn_list(shapes, dtype, device, gen)
        grads = randn_list(shapes, dtype, device, gen, scale=2.0)
        scales = torch.rand(len(shapes), generator=gen) * 0.1
        if len(shapes) > 3:
            scales[1], scales[2], scales[3] = float("nan"), float("inf"), 0.0
        original = [p.clone() for p in params]
        backups = [torch.full_like(p, 7.0) for p in params]
        ops.perturb_per_tensor_(params, grads, backups, scales.to(device), backend=backend)
        assert all(torch.equal(b, o) for b, o in zip(backups, original))
        for i, (p, ref, o) in enumerate(zip(params, reference_perturb(original, grads, scales), original)):
            if not torch.isfinite(scales[i]) or scales[i] == 0:
                assert torch.equal(p, o), f"tensor {i} with scale {scales[i]} must stay bit-identical"
            else:
                assert_close_dtype(p, ref, dtype)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("perturb_per_tensor", [torch.float32]))
def test_perturb_per_tensor_odd_layouts(device, backend, dtype):
    gen = torch.Generator().manual_seed(11)
    w = [torch.randn(40, 30, generator=gen).t().to(device), torch.randn(2, 3, 4, 5, generator=gen).to(device)
         .to(memory_format=torch.channels_last)]
    g = [torch.randn(40, 30, generator=gen).to(device), torch.randn(2, 3, 4, 5, generator=gen).to(device)]
    g[0] = g[0].t()
    b = [torch.empty_like(x) for x in w]
    scales = torch.tensor([0.3, -0.2], device=device)
    original = [x.clone() for x in w]
    ops.perturb_per_tensor_(w, g, b, scales, backend=backend)
    for p, ref in zip(w, reference_perturb(original, g, scales)):
        assert_close_dtype(p, ref, dtype)
    assert all(torch.equal(x, y) for x, y in zip(b, original))


def test_perturb_per_tensor_mixed_buckets_empty_and_bad_input():
    gen = torch.Generator().manual_seed(4)
    params = randn_list([(10,), (3, 3)], torch.float32, "cpu", gen) + [torch.empty(0)] + \
        randn_list([(6,)], torch.bfloat16, "cpu", gen)
    grads = [torch.ones_like(p) for p in params]
    backups = [torch.empty_like(p) for p in params]
    original = [p.clone() for p in params]
    scales = torch.tensor([0.5, 1.0, 3.0, 0.25])
    ops.perturb_per_tensor_(params, grads, backups, scales, backend="torch")
    for p, ref in zip(params, reference_perturb(original, grads, scales)):
        assert_close_dtype(p, ref, p.dtype)
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="one entry per parameter"):
        ops.perturb_per_tensor_(params, grads, backups, torch.ones(3))
    with pytest.raises(ValueError, match="does not match"):
        ops.perturb_per_tensor_(params, grads[:1] + grads[1:2] * 3, backups, scales)
    with pytest.raises(TypeError, match="floating point"):
        ops.perturb_per_tensor_(params, grads, backups, torch.ones(4, dtype=torch.int64))
    assert all(torch.equal(a, b) for a, b in zip(params, before))


# ------------------------------------------------------------------------------------------------
# a constant amount of work per call

def _count_dispatched(fn):
    """Dispatched ops that do work, by name. View ops (``aten.view``, ``aten.slice``: metadata only,
    no kernel) are left out: the torch backend packs a bucket into one flat vector and writes back
    through one view per tensor."""

    with op_counter(skip_views=True) as c:
        fn()
    return c.ops


@pytest.mark.parametrize("backend", ["torch"])
def test_torch_backend_dispatches_a_constant_number_of_ops(backend):
    def run(n):
        gen = torch.Generator().manual_seed(0)
        ps = randn_list([(5, 3)] * n, torch.float32, "cpu", gen)
        gs = randn_list([(5, 3)] * n, torch.float32, "cpu", gen)
        bs = [torch.empty_like(p) for p in ps]
        s = torch.rand(n, generator=gen)
        ops.perturb_per_tensor_(ps, gs, bs, s, backend=backend)  # warm the caches
        norm_ops = _count_dispatched(lambda: ops.per_tensor_norm(gs, backend=backend))
        perturb_ops = _count_dispatched(lambda: ops.perturb_per_tensor_(ps, gs, bs, s, backend=backend))
        return norm_ops, perturb_ops

    assert run(4) == run(150)


@pytest.mark.triton
def test_triton_launches_are_constant():
    if not ops.supports("triton", "per_tensor_norm", torch.device("cpu"), torch.float32)[0]:
        pytest.skip("Triton backend unavailable")
    from fastsam.kernels import _multi_tensor

    def run(n):
        gen = torch.Generator().manual_seed(0)
        ps = randn_list([(5, 3)] * n, torch.float32, "cpu", gen)
        gs = randn_list([(5, 3)] * n, torch.float32, "cpu", gen)
        bs = [torch.empty_like(p) for p in ps]
        _multi_tensor.launches.clear()
        ops.per_tensor_norm(gs, backend="triton")
        ops.perturb_per_tensor_(ps, gs, bs, torch.rand(n, generator=gen), backend="triton")
        return dict(_multi_tensor.launches)

    assert run(3) == run(120) == {"grad_sq_norm_partials_kernel": 1, "segment_sums_kernel": 1,
                                  "perturb_per_tensor_kernel": 1}


@pytest.mark.triton
@pytest.mark.parametrize("name", ["per_tensor_sq_norms_triton", "perturb_per_tensor_triton_"])
def test_triton_opcheck(name):
    if not ops.supports("triton", "per_tensor_norm", torch.device("cpu"), torch.float32)[0]:
        pytest.skip("Triton backend unavailable")
    import fastsam.kernels  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(2)
    shapes = [(5,), (3, 7), (33,), (1,)]
    a, b, c = (randn_list(shapes, torch.float32, "cpu", gen) for _ in range(3))
    args = (a,) if name.startswith("per_tensor") else (a, b, c, torch.tensor([0.1, float("nan"), -0.3, 2.0]))
    result = torch.library.opcheck(getattr(torch.ops.fastsam, name).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ------------------------------------------------------------------------------------------------
# the CUDA kernels' code on the host (tests/csrc/host_emulation.cu)

@pytest.fixture(scope="module")
def emu():
    from csrc_emulation import emulation_or_skip

    return emulation_or_skip()


def _misaligned(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_through_the_host_emulation(emu, dtype):
    gen = torch.Generator().manual_seed(9)
    chunk = emu.chunk_size
    shapes = [(chunk * 2 + 3,), (1,), (4097,), (3, 5)] + [(7,)] * 5
    xs = randn_list(shapes, dtype, "cpu", gen)
    xs = [_misaligned(x) if i % 2 else x for i, x in enumerate(xs)]  # vector path and scalar path
    got = emu.per_tensor_sq_norms(xs)
    torch.testing.assert_close(got.double().sqrt(), reference_norms(xs), rtol=2e-5, atol=1e-6)
    assert torch.equal(emu.per_tensor_sq_norms(xs), got)  # deterministic

    params = randn_list(shapes, dtype, "cpu", gen)
    grads = randn_list(shapes, dtype, "cpu", gen)
    backups = [torch.empty_like(p) for p in params]
    scales = torch.rand(len(shapes), generator=gen)
    scales[2] = float("nan")
    original = [p.clone() for p in params]
    emu.perturb_per_tensor_(params, grads, backups, scales)
    assert all(torch.equal(b, o) for b, o in zip(backups, original))
    assert torch.equal(params[2], original[2])
    for p, ref in zip(params, reference_perturb(original, grads, scales)):
        assert_close_dtype(p, ref, dtype)


def test_cuda_kernels_over_many_launches(emu):
    """More tensors than one launch's metadata holds: the output / scale index carries over launches."""
    n = emu.max_tensors(3) * 2 + 5
    gen = torch.Generator().manual_seed(10)
    shapes = [(int(s),) for s in torch.randint(1, 40, (n,), generator=gen)]
    xs = randn_list(shapes, torch.float32, "cpu", gen)
    torch.testing.assert_close(emu.per_tensor_sq_norms(xs).double().sqrt(), reference_norms(xs),
                               rtol=2e-5, atol=1e-6)
    params, grads = randn_list(shapes, torch.float32, "cpu", gen), randn_list(shapes, torch.float32, "cpu", gen)
    backups = [torch.empty_like(p) for p in params]
    scales = torch.arange(n, dtype=torch.float32) / n
    original = [p.clone() for p in params]
    emu.perturb_per_tensor_(params, grads, backups, scales)
    for p, ref in zip(params, reference_perturb(original, grads, scales)):
        assert_close_dtype(p, ref, torch.float32)
    with pytest.raises(ValueError, match="empty"):
        emu.per_tensor_sq_norms([torch.empty(0)])
