"""grad_norm: every backend against an fp64 per-tensor reference."""

import pytest
import torch

from fastsam import ops
from helpers import backend_cases, randn_list, shape_sets


def reference_sq_norm(grads, params, mode, eta):
    total = torch.zeros((), dtype=torch.float64)
    for i, g in enumerate(grads):
        g = g.double().cpu()
        if mode == "plain":
            term = g * g
        elif mode == "adaptive":
            term = ((params[i].double().cpu().abs() + eta) * g) ** 2
        else:
            term = g * g / (1 + eta * g * g)
        total += term.sum()
    return total


@pytest.mark.parametrize("mode,eta", [("plain", 0.0), ("adaptive", 0.0), ("adaptive", 0.01), ("fisher", 1.0),
                                      ("fisher", 0.3)])
@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_norm"))
def test_grad_norm_matches_reference(device, backend, dtype, mode, eta):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), mode, eta)) % 2**31)
    for shapes in shape_sets(gen):
        grads = randn_list(shapes, dtype, device, gen, scale=1.7)
        params = randn_list(shapes, dtype, device, gen)
        sq = ops.grad_sq_norm(grads, params, mode=mode, eta=eta, backend=backend)
        assert sq.dtype == torch.float32 and sq.dim() == 0 and sq.device.type == device
        ref = reference_sq_norm(grads, params, mode, eta)
        # fp32 accumulation over up to 278011 terms: relative error well below 1e-5.
        torch.testing.assert_close(sq.double().cpu(), ref, rtol=2e-5, atol=1e-6)
        norm = ops.grad_norm(grads, params, mode=mode, eta=eta, backend=backend)
        torch.testing.assert_close(norm.double().cpu(), ref.sqrt(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_norm"))
def test_grad_norm_is_deterministic(device, backend, dtype):
    gen = torch.Generator().manual_seed(7)
    grads = randn_list([(278011,), (33, 7), (5,)], dtype, device, gen)
    first = ops.grad_norm(grads, backend=backend)
    for _ in range(3):
        assert torch.equal(ops.grad_norm(grads, backend=backend), first)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("grad_norm", dtypes=[torch.float32]))
def test_grad_norm_propagates_non_finite(device, backend, dtype):
    for bad in (float("inf"), float("nan")):
        grads = [torch.ones(10, device=device), torch.ones(4097, device=device)]
        grads[1][4000] = bad
        assert not torch.isfinite(ops.grad_norm(grads, backend=backend))


def test_grad_norm_mixed_dtypes_and_errors():
    gen = torch.Generator().manual_seed(3)
    grads = randn_list([(100,), (7, 3)], torch.float32, "cpu", gen) + randn_list([(50,)], torch.bfloat16, "cpu", gen)
    ref = reference_sq_norm(grads, None, "plain", 0.0)
    torch.testing.assert_close(ops.grad_sq_norm(grads).double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        ops.grad_norm(grads, mode="bogus")
    with pytest.raises(ValueError, match="needs params"):
        ops.grad_norm(grads, mode="adaptive")
    with pytest.raises(ValueError, match="eta"):
        ops.grad_norm(grads, grads, mode="fisher", eta=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        ops.grad_norm([])

