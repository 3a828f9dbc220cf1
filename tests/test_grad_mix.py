"""grad_mix_: every backend against an fp64 per-tensor reference, both forms, the skip flag, bad input."""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, randn_list, shape_sets

CASES = backend_cases("grad_mix") + [pytest.param("cpu", "torch", torch.float64, id="cpu-torch-float64")]


def reference_grad_mix(xs, ys, a, b, swap):
    """fp64, tensor by tensor: (new xs, new ys)."""
    new_x, new_y = [], []
    for x, y in zip(xs, ys):
        x64, y64 = x.double().cpu(), y.double().cpu()
        mixed = a * x64 + b * y64
        new_x.append(y64 if swap else mixed)
        new_y.append(mixed if swap else y64)
    return new_x, new_y


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("device,backend,dtype", CASES)
def test_grad_mix_matches_reference(device, backend, dtype, swap):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), swap)) % 2 ** 31)
    for shapes in shape_sets(gen):
        xs = randn_list(shapes, dtype, device, gen)
        ys = randn_list(shapes, dtype, device, gen, scale=0.5)
        x0, y0 = [x.clone() for x in xs], [y.clone() for y in ys]
        a, b = 9.0, torch.tensor(-8.0, device=device)  # WSAM's alpha g_p + (1 - alpha) g at gamma = 0.9
        ops.grad_mix_(xs, ys, a, b, swap=swap, backend=backend)
        ref_x, ref_y = reference_grad_mix(x0, y0, 9.0, -8.0, swap)
        for x, y, rx, ry in zip(xs, ys, ref_x, ref_y):
            # Mixing with weights 9 and -8 amplifies the inputs' own rounding: compare relative to the inputs.
            assert_close_dtype(x, rx, dtype, factor=17)
            assert_close_dtype(y, ry, dtype, factor=17)
        if swap:
            assert all(torch.equal(x, y) for x, y in zip(xs, y0)), "the swap moves y into x exactly"
        else:
            assert all(torch.equal(y, y_) for y, y_ in zip(ys, y0)), "y is read only without swap"


@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_mix", dtypes=[torch.float32]))
def test_grad_mix_axpy_form_and_tensor_coefficients(device, backend, dtype):
    """WSAM's decoupled term ``w += -lr alpha s`` with a tensor learning rate; a = 1 leaves x exact."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4097,), (3, 5), (1,)]
    ws = randn_list(shapes, dtype, device, gen)
    ss = randn_list(shapes, dtype, device, gen)
    w0 = [w.clone() for w in ws]
    lr = torch.tensor(0.1, device=device)
    ops.grad_mix_(ws, ss, 1.0, -lr * 9.0, backend=backend)
    for w, x, s in zip(ws, w0, ss):
        assert_close_dtype(w, x.double() - 0.9 * s.double(), dtype)
    w1 = [w.clone() for w in ws]
    ops.grad_mix_(ws, ss, 1.0, 0.0, backend=backend)
    assert all(torch.equal(w, x) for w, x in zip(ws, w1))


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_mix"))
def test_grad_mix_skip_flag_leaves_both_untouched(device, backend, dtype, swap):
    gen = torch.Generator().manual_seed(4)
    shapes = [(4097,), (3, 5)]
    xs, ys = randn_list(shapes, dtype, device, gen), randn_list(shapes, dtype, device, gen)
    ys[0][5] = float("inf")
    x0, y0 = [x.clone() for x in xs], [y.clone() for y in ys]
    ops.grad_mix_(xs, ys, 0.5, 0.5, swap=swap, skip=torch.tensor(1.0, device=device), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(xs + ys, x0 + y0))
    ops.grad_mix_(xs, ys, 0.5, 0.5, swap=swap, skip=torch.tensor(0.0, device=device), backend=backend)
    assert not torch.equal(xs[1], x0[1])


@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_mix", dtypes=[torch.float32]))
def test_grad_mix_non_contiguous(device, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(40, 30, generator=gen).t(), torch.randn(2, 3, 4, generator=gen).permute(2, 0, 1)]
    ys = [torch.randn(x.shape, generator=gen) for x in xs]  # contiguous: another layout than x
    x0, y0 = [x.clone() for x in xs], [y.clone() for y in ys]
    ops.grad_mix_(xs, ys, 0.3, 2.0, swap=True, backend=backend)
    ref_x, ref_y = reference_grad_mix(x0, y0, 0.3, 2.0, True)
    for x, y, rx, ry in zip(xs, ys, ref_x, ref_y):
        assert_close_dtype(x, rx, dtype)
        assert_close_dtype(y, ry, dtype)


def test_grad_mix_validates_before_touching_anything():
    x, y = [torch.ones(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match="one tensor per parameter"):
        ops.grad_mix_(x, [], 1.0, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        ops.grad_mix_(x, [torch.ones(4)], 1.0, 1.0)
    with pytest.raises(ValueError, match="a must be"):
        ops.grad_mix_(x, y, float("nan"), 1.0)
    with pytest.raises(ValueError, match="b must be"):
        ops.grad_mix_(x, y, 1.0, torch.ones(2))
    with pytest.raises(ValueError, match="skip"):
        ops.grad_mix_(x, y, 1.0, 1.0, skip=True)
    assert torch.equal(x[0], torch.ones(3)) and torch.equal(y[0], torch.ones(3))
