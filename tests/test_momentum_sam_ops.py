"""Momentum-SAM's ops (momentum_sam_sgd_, momentum_sam_adamw_, momentum_sam_shift_) on every backend.

Each backend (torch, Triton, CUDA where they run; fp64 on torch) against an fp64 per-tensor
reference written from the op's docstring and against the torch backend, on fresh random inputs of
odd sizes (1, 4097, a mixed list), every dtype, Nesterov on and off, AdamW at several step counts;
the returned squared norm is the new momentum's as stored, fp32 on the device, deterministic; a
bucket of many tensors is one launch (plus the fixed reduction); mismatched lists are refused by
every backend before anything is written. Sizes stay small: Triton runs under the interpreter on CPU.
"""

import math

import pytest
import torch

from fastsam import ops
from helpers import DTYPES, TOL, assert_close_dtype, backend_cases, many_shapes, randn_list

SHAPE_SETS = [[(1,)], [(4097,)], [(3, 5), (1,), (70, 3), (4097,), (2, 2, 2)]]
ALL = DTYPES + [torch.float64]


def _sq(ts) -> float:
    return sum(float((t.double() ** 2).sum()) for t in ts)


def _assert_sq(sq, stored, ref_sq, torch_sq, dtype, device):
    """The returned squared norm: fp32 (fp64 for fp64) on the device, that of the stored buffers."""
    assert sq.shape == () and sq.device.type == device
    assert sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert math.isclose(float(sq), _sq(stored), rel_tol=1e-9 if dtype == torch.float64 else 2e-5)
    rtol = TOL[dtype][0] * 2
    assert math.isclose(float(sq), ref_sq, rel_tol=rtol) and math.isclose(float(sq), float(torch_sq), rel_tol=rtol)


def _inputs(shapes, dtype, device, gen, k):
    return [randn_list(shapes, dtype, device, gen) for _ in range(k)]


# ------------------------------------------------------------------------------------------------ SGD form

def reference_sgd(w, g, v, s_old, lr, mu, wd, nesterov):
    """fp64, one tensor: (w_new, v_new) from the ascent point w (module docstring of fastsam.ops.momentum_sam)."""
    w, g, v = w.double().cpu(), g.double().cpu(), v.double().cpu()
    d = g + wd * w
    w = w + s_old * v
    v = mu * v + d
    w = w - lr * (d + mu * v if nesterov else v)
    return w, v


SGD_CONFIGS = [dict(momentum=0.9, weight_decay=1e-2, nesterov=False),
               dict(momentum=0.9, weight_decay=0.0, nesterov=True),
               dict(momentum=0.0, weight_decay=5e-4, nesterov=False)]


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_sgd", ALL))
def test_sgd_matches_fp64_reference_and_torch_backend(device, backend, dtype, config):
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), str(config))) % 2 ** 31)
    for shapes in SHAPE_SETS:
        w, g, v = _inputs(shapes, dtype, device, gen, 3)
        tw, tv = [x.clone() for x in w], [x.clone() for x in v]
        expected = [reference_sgd(a, b, c, 0.07, 0.1, config["momentum"], config["weight_decay"], config["nesterov"])
                    for a, b, c in zip(w, g, v)]
        s_old = torch.tensor(0.07, dtype=torch.float64, device=device)  # as precise as the fp64 reference
        sq = ops.momentum_sam_sgd_(w, g, v, s_old=s_old, lr=0.1, backend=backend, **config)
        torch_sq = ops.momentum_sam_sgd_(tw, g, tv, s_old=s_old, lr=0.1, backend="torch", **config)
        for a, b, ta, tb, (ew, ev) in zip(w, v, tw, tv, expected):
            assert_close_dtype(a, ew, dtype, factor=4)
            assert_close_dtype(b, ev, dtype, factor=4)
            assert_close_dtype(a, ta.double(), dtype, factor=4)
            assert_close_dtype(b, tb.double(), dtype, factor=4)
        _assert_sq(sq, v, sum(float((e[1] ** 2).sum()) for e in expected), torch_sq, dtype, device)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_sgd", [torch.float32]))
def test_sgd_norm_is_deterministic_and_a_zero_scale_is_a_plain_sgd_step(device, backend, dtype):
    """Same inputs, same bits (fixed reduction order); with s_old = 0 the step is torch.optim.SGD's."""
    gen = torch.Generator().manual_seed(11)
    shapes = many_shapes(gen, 12) + [(4097,)]
    w, g, v = _inputs(shapes, dtype, device, gen, 3)
    runs = []
    for _ in range(2):
        ws, vs = [x.clone() for x in w], [x.clone() for x in v]
        sq = ops.momentum_sam_sgd_(ws, g, vs, s_old=0.0, lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True,
                                   backend=backend)
        runs.append((ws, vs, sq))
    assert torch.equal(runs[0][2], runs[1][2])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]))
    params = [torch.nn.Parameter(x.clone()) for x in w]
    sgd = torch.optim.SGD(params, lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True)
    for p, gi, vi in zip(params, g, v):
        p.grad = gi.clone()
        sgd.state[p]["momentum_buffer"] = vi.clone()
    sgd.step()
    for p, a, b in zip(params, runs[0][0], runs[0][1]):
        torch.testing.assert_close(a, p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, sgd.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ AdamW form

def reference_adamw(w, g, m, u, s_old, lr, b1, b2, eps, wd, step):
    """fp64, one tensor: (w_new, m_new, u_new), the authors' AdamW_MSAM order (decay after the step)."""
    w, g, m, u = (x.double().cpu() for x in (w, g, m, u))
    w = w + s_old * m
    m = b1 * m + (1 - b1) * g
    u = b2 * u + (1 - b2) * g * g
    w = w - lr / (1 - b1 ** step) * m / (u.sqrt() / math.sqrt(1 - b2 ** step) + eps)
    return w * (1 - lr * wd), m, u


@pytest.mark.parametrize("step,wd", [(1, 0.1), (2, 0.0), (10, 1e-2)])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_adamw", ALL))
def test_adamw_matches_fp64_reference_and_torch_backend(device, backend, dtype, step, wd):
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), step)) % 2 ** 31)
    b1, b2, eps, lr = 0.9, 0.99, 1e-8, 1e-2
    for shapes in SHAPE_SETS:
        w, g, m, u = _inputs(shapes, dtype, device, gen, 4)
        u = [x.abs() for x in u]
        tw, tm, tu = ([x.clone() for x in xs] for xs in (w, m, u))
        expected = [reference_adamw(*args, 0.05, lr, b1, b2, eps, wd, step) for args in zip(w, g, m, u)]
        kw = dict(s_old=0.05, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=step)
        sq = ops.momentum_sam_adamw_(w, g, m, u, backend=backend, **kw)
        torch_sq = ops.momentum_sam_adamw_(tw, g, tm, tu, backend="torch", **kw)
        for got, ref, want in zip((w, m, u), (tw, tm, tu), zip(*expected)):
            for a, r, e in zip(got, ref, want):
                assert_close_dtype(a, e, dtype, factor=4)
                assert_close_dtype(a, r.double(), dtype, factor=4)
        _assert_sq(sq, m, sum(float((e[1] ** 2).sum()) for e in expected), torch_sq, dtype, device)


# ------------------------------------------------------------------------------------------------ the shift

@pytest.mark.parametrize("with_backups", [True, False])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_shift", ALL))
def test_shift_matches_fp64_reference_and_backs_up_exactly(device, backend, dtype, with_backups):
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), with_backups)) % 2 ** 31)
    for shapes in SHAPE_SETS:
        w, v = _inputs(shapes, dtype, device, gen, 2)
        w0 = [x.clone() for x in w]
        tw = [x.clone() for x in w]
        backups = [torch.full_like(x, float("nan")) for x in w] if with_backups else None
        scale = torch.tensor(-0.3, dtype=torch.float64, device=device)
        ops.momentum_sam_shift_(w, v, scale, backups, backend=backend)
        ops.momentum_sam_shift_(tw, v, scale, backend="torch")
        for a, o, t, c in zip(w, w0, tw, v):
            assert_close_dtype(a, o.double() - 0.3 * c.double(), dtype)
            assert_close_dtype(a, t.double(), dtype)
        if with_backups:
            assert all(torch.equal(b, o) for b, o in zip(backups, w0))


@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_shift", [torch.float32]))
def test_shift_there_and_back_is_exact_through_the_backup(device, backend, dtype):
    """The ascent move then the restore from its backup leaves the weights bit-identical."""
    gen = torch.Generator().manual_seed(12)
    w, v = _inputs([(4097,), (3, 5)], dtype, device, gen, 2)
    w0 = [x.clone() for x in w]
    backups = [torch.empty_like(x) for x in w]
    ops.momentum_sam_shift_(w, v, 0.25, backups, backend=backend)
    assert not torch.equal(w[0], w0[0])
    ops.restore_(w, backups, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(w, w0))


# ------------------------------------------------------------------------------------------------ layouts, launches

@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_sgd", [torch.float32]))
def test_non_contiguous_tensors(device, backend, dtype):
    gen = torch.Generator().manual_seed(13)
    w = [torch.randn(40, 30, generator=gen).t().to(device), torch.randn(2, 3, 4, generator=gen).permute(2, 0, 1).to(device)]
    g = [torch.randn(x.shape, generator=gen).to(device) for x in w]  # contiguous: another layout than w
    v = [torch.randn(x.shape, generator=gen).to(device) for x in w]
    m = [x.clone() for x in v]
    u = [torch.rand(x.shape, generator=gen).to(device) for x in w]
    exp = [reference_sgd(a, b, c, 0.1, 0.1, 0.9, 1e-2, False) for a, b, c in zip(w, g, v)]
    exp_adam = [reference_adamw(*args, 0.1, 1e-2, 0.9, 0.99, 1e-8, 0.1, 4) for args in zip(w, g, m, u)]
    w_adam = [x.clone() for x in w]
    sq = ops.momentum_sam_sgd_(w, g, v, s_old=0.1, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    ops.momentum_sam_adamw_(w_adam, g, m, u, s_old=0.1, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                            step=4, backend=backend)
    for a, b, (ew, ev) in zip(w, v, exp):
        assert_close_dtype(a, ew, dtype)
        assert_close_dtype(b, ev, dtype)
    for a, b, c, (ew, em, eu) in zip(w_adam, m, u, exp_adam):
        assert_close_dtype(a, ew, dtype)
        assert_close_dtype(b, em, dtype)
        assert_close_dtype(c, eu, dtype)
    assert math.isclose(float(sq), _sq(v), rel_tol=2e-5)
    backups = [torch.empty_like(x) for x in w]
    w1 = [x.clone() for x in w]
    ops.momentum_sam_shift_(w, v, -0.5, backups, backend=backend)
    for a, o, c, b in zip(w, w1, v, backups):
        assert torch.equal(b, o)
        assert_close_dtype(a, o.double() - 0.5 * c.double(), dtype)


triton_cases = [c for c in backend_cases("momentum_sam_sgd", [torch.float32]) if c.values[1] == "triton"]


@pytest.mark.parametrize("device,backend,dtype", triton_cases)
def test_triton_launches_do_not_grow_with_the_number_of_tensors(device, backend, dtype):
    from fastsam.kernels import _multi_tensor

    counts = []
    for n in (3, 30):
        gen = torch.Generator().manual_seed(n)
        shapes = many_shapes(gen, n)
        w, g, v, u = _inputs(shapes, dtype, device, gen, 4)
        u = [x.abs() for x in u]
        before = _multi_tensor.launches.copy()
        ops.momentum_sam_sgd_(w, g, v, s_old=0.1, lr=0.1, backend=backend)
        ops.momentum_sam_adamw_(w, g, v, u, s_old=0.1, lr=0.1, step=2, backend=backend)
        ops.momentum_sam_shift_(w, v, -0.1, [torch.empty_like(x) for x in w], backend=backend)
        counts.append(_multi_tensor.launches - before)
    assert counts[0] == counts[1], counts
    assert counts[0]["momentum_sam_sgd_kernel"] == counts[0]["momentum_sam_adamw_kernel"] == 1
    assert counts[0]["momentum_sam_shift_kernel"] == 1


@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_sgd", [torch.float32]))
def test_empty_tensors_in_a_bucket(device, backend, dtype):
    """Zero-element parameters (a frozen-size placeholder) are skipped; an all-empty bucket has norm 0."""
    gen = torch.Generator().manual_seed(14)
    shapes = [(0,), (4097,), (3, 0)]
    w, g, v, u = _inputs(shapes, dtype, device, gen, 4)
    u = [x.abs() for x in u]
    exp = [reference_sgd(a, b, c, 0.1, 0.1, 0.9, 0.0, False) for a, b, c in zip(w, g, v)]
    sq = ops.momentum_sam_sgd_(w, g, v, s_old=0.1, lr=0.1, backend=backend)
    assert_close_dtype(w[1], exp[1][0], dtype)
    assert math.isclose(float(sq), _sq(v), rel_tol=2e-5)
    ops.momentum_sam_shift_(w, v, -0.1, [torch.empty_like(x) for x in w], backend=backend)
    empty = [torch.zeros(0, device=device)]
    assert float(ops.momentum_sam_sgd_(empty, empty, empty, s_old=0.1, lr=0.1, backend=backend)) == 0.0
    assert float(ops.momentum_sam_adamw_(empty, empty, empty, empty, s_old=0.1, lr=0.1, backend=backend)) == 0.0


# ------------------------------------------------------------------------------------------------ bad input

def _every_backend(op):
    return sorted({c.values[1] for c in backend_cases(op, [torch.float32])})


@pytest.mark.parametrize("backend", _every_backend("momentum_sam_sgd"))
def test_backends_refuse_mismatched_lists_before_writing(backend):
    """Each backend checks lengths and shapes itself (it may be called past the public wrapper)."""
    from fastsam.ops import _dispatch

    w = [torch.zeros(4097), torch.zeros(3, 5)]
    good = [torch.ones(4097), torch.ones(3, 5)]
    bad_shape, short = [torch.ones(4097), torch.ones(5, 3)], [torch.ones(4097)]
    s = torch.tensor(0.1)
    for other in (bad_shape, short):
        with pytest.raises(ValueError, match="momentum_sam_sgd"):
            _dispatch.implementations("momentum_sam_sgd")[backend](w, good, other, s, 0.1, 0.9, 0.0, False)
        with pytest.raises(ValueError, match="momentum_sam_adamw"):
            _dispatch.implementations("momentum_sam_adamw")[backend](w, good, good, other, s, 0.1, 0.9, 0.999, 1e-8,
                                                                     0.0, 1)
        with pytest.raises(ValueError, match="momentum_sam_shift"):
            _dispatch.implementations("momentum_sam_shift")[backend](w, good, s, other)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in w)
    assert all(torch.equal(x, torch.ones_like(x)) for x in good)


def test_public_ops_refuse_bad_scalars_before_writing():
    w, g, v = [torch.zeros(5)], [torch.ones(5)], [torch.ones(5)]
    with pytest.raises(ValueError, match="lr"):
        ops.momentum_sam_sgd_(w, g, v, s_old=0.0, lr=float("nan"))
    with pytest.raises(ValueError, match="Nesterov"):
        ops.momentum_sam_sgd_(w, g, v, s_old=0.0, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="scale"):
        ops.momentum_sam_sgd_(w, g, v, s_old=torch.zeros(2), lr=0.1)
    with pytest.raises(ValueError, match="beta2"):
        ops.momentum_sam_adamw_(w, g, v, v, s_old=0.0, lr=0.1, beta2=1.0)
    with pytest.raises(ValueError, match="step"):
        ops.momentum_sam_adamw_(w, g, v, v, s_old=0.0, lr=0.1, step=0)
    with pytest.raises(ValueError, match="scale"):
        ops.momentum_sam_shift_(w, v, torch.ones(3))
    assert torch.equal(w[0], torch.zeros(5)) and torch.equal(v[0], torch.ones(5))
