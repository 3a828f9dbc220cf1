"""bsam_noise_, bsam_ascent_, bsam_step_: the torch backend against fp64 per-tensor references."""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, many_shapes, randn_list, shape_sets

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


# ---------------------------------------------------------------------------------- the kernel backends

KERNEL_CASES = {op: [c for c in cases(op) if c.values[1] != "torch"] for op in ("bsam_noise", "bsam_ascent",
                                                                                  "bsam_step")}


def odd_layouts(dtype, device, gen):
    """Contiguous tensors of sizes 1 and 4097, a transposed one and a channels_last one (walked in place
    or through temporaries by the kernels; the noise must still follow row-major order)."""
    out = [torch.randn(1, generator=gen), torch.randn(4097, generator=gen),
           torch.randn(33, 17, generator=gen).t(),
           torch.randn(2, 3, 5, 4, generator=gen).contiguous(memory_format=torch.channels_last)]
    return [x.to(device=device, dtype=dtype) for x in out]


def _like(ts, positive_values=False, gen=None):
    out = []
    for t in ts:
        x = torch.empty_like(t)  # keeps t's layout
        x.copy_((0.5 + torch.rand(t.shape, generator=gen)) if positive_values else torch.randn(t.shape, generator=gen))
        out.append(x)
    return out


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CASES["bsam_noise"])
def test_bsam_noise_kernels_draw_the_torch_backends_noise(device, backend, dtype):
    """Same generator state in, same noise (hence the torch backend's result) and the same state out."""
    gen = torch.Generator().manual_seed(11)
    for params in (odd_layouts(dtype, device, gen), randn_list(many_shapes(gen, 12), dtype, device, gen)):
        s = [x.to(device=device, dtype=dtype) for x in _like([p.cpu() for p in params], positive_values=True, gen=gen)]
        mine, ref = [p.clone() for p in params], [p.clone() for p in params]
        b1, b2 = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
        g1, g2 = (torch.Generator(device=device).manual_seed(21) for _ in range(2))
        ops.bsam_noise_(mine, b1, s, 50000, g1, backend=backend)
        ops.bsam_noise_(ref, b2, s, 50000, g2, backend="torch")
        assert torch.equal(g1.get_state(), g2.get_state()), "one draw of sum(numel) normals, as the torch backend"
        for a, b, w in zip(mine, ref, params):
            assert not torch.equal(a, w), "the noise moved the weights"
            # one rounding each, of the same fp32 value up to the order of the fp32 operations
            torch.testing.assert_close(a, b, rtol=TOL_SAME[dtype], atol=TOL_SAME[dtype] * 1e-2)
        assert all(torch.equal(x, w) for x, w in zip(b1, params))


TOL_SAME = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("device,backend,dtype", KERNEL_CASES["bsam_ascent"] + KERNEL_CASES["bsam_step"])
def test_bsam_ascent_and_step_kernels_on_odd_layouts(device, backend, dtype):
    """Transposed and channels_last tensors: the kernels agree with the fp64 reference there too."""
    gen = torch.Generator().manual_seed(12)
    params = odd_layouts(dtype, device, gen)
    backups, grads, m = ([x.to(device) for x in _like([p.cpu() for p in params], gen=gen)] for _ in range(3))
    s, h = ([x.to(device) for x in _like([p.cpu() for p in params], positive_values=True, gen=gen)] for _ in range(2))
    backups, grads, m, s, h = ([x.to(dtype) for x in lst] for lst in (backups, grads, m, s, h))
    w_p = [torch.empty_like(p) for p in params]
    out_h = [torch.empty_like(p) for p in params]
    ops.bsam_ascent_(w_p, backups, grads, s, out_h, 0.2, True, backend=backend)
    m0, s0 = [x.clone() for x in m], [x.clone() for x in s]
    ops.bsam_step_(params, backups, grads, m, s, h, lr=torch.tensor(0.3, device=device), beta1=0.3, beta2=0.9,
                   weight_decay=1e-2, damping=0.5, backend=backend)
    for i, w in enumerate(backups):
        w64, g64, m64, s64, h64 = (x[i].double().cpu() for x in (backups, grads, m0, s0, h))
        assert_close_dtype(w_p[i], w64 + 0.2 * w64 * w64 * g64 / s64, dtype, factor=2)
        assert_close_dtype(out_h[i], torch.sqrt(s64) * g64.abs(), dtype, factor=2)
        m_ref = 0.3 * m64 + 0.7 * (g64 + 1e-2 * w64)
        assert_close_dtype(m[i], m_ref, dtype, factor=4)
        assert_close_dtype(params[i], w64 - 0.3 * m_ref / s64, dtype, factor=8)
        assert_close_dtype(s[i], 0.9 * s64 + 0.1 * (h64 + 0.5 + 1e-2), dtype, factor=4)
        assert params[i].stride() == backups[i].stride()


@pytest.mark.parametrize("device,backend,dtype", [c for c in cases("bsam_step") if c.values[2] == torch.float32])
def test_bsam_backends_check_lengths_and_shapes_before_launching(device, backend, dtype):
    """Each backend function, called directly (as BSAM does), refuses short lists and wrong shapes
    before it touches anything, the noise generator included."""
    from fastsam.ops import resolve

    gen = torch.Generator().manual_seed(13)
    shapes = [(4097,), (3, 5)]
    p, b, g, m = (randn_list(shapes, dtype, device, gen) for _ in range(4))
    s, h = positive(shapes, dtype, device, gen), positive(shapes, dtype, device, gen)
    snapshot = [x.clone() for x in p + b + g + m + s + h]
    wrong = [b[0], torch.zeros(5, 3, dtype=dtype, device=device)]
    noise = resolve("bsam_noise", backend, torch.device(device), dtype)[1]
    ascent = resolve("bsam_ascent", backend, torch.device(device), dtype)[1]
    step = resolve("bsam_step", backend, torch.device(device), dtype)[1]
    noise_gen = torch.Generator(device=device).manual_seed(3)
    state = noise_gen.get_state()
    calls = [
        lambda: noise(p, b[:1], s, 10, noise_gen),
        lambda: noise(p, b, wrong, 10, noise_gen),
        lambda: ascent(p, b, g[:1], s, h, 0.1, False),
        lambda: ascent(p, b, g, s, wrong, 0.1, False),
        lambda: step(p, b, g, m, s[:1], h, 0.1, 0.9, 0.999, 0.0, 0.1),
        lambda: step(p, b, g, wrong, s, h, 0.1, 0.9, 0.999, 0.0, 0.1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="tensors, expected|has shape"):
            call()
    assert torch.equal(noise_gen.get_state(), state), "nothing drawn"
    assert all(torch.equal(x, y) for x, y in zip(p + b + g + m + s + h, snapshot))
