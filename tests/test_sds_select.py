"""sds_select / sds_weights: exact-k, the sharpest samples, deterministic ties, every backend."""

import math

import pytest
import torch

from fastsam import ops
from helpers import DEVICES, backends_for

BATCHES = [1, 2, 7, 128, 1000, 4097, 65536]


def batches_for(device, backend):
    """The Triton kernel ranks by counting (B^2 comparisons): under the CPU interpreter 65536 would take
    minutes, so it runs on GPUs only (the cuda cases of these tests)."""
    if backend == "triton" and device == "cpu":
        return [b for b in BATCHES if b <= 4097]
    return BATCHES


def cases(op):
    out = []
    for device in DEVICES:
        for backend in backends_for(op, device, torch.float32):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                out.append(pytest.param(device, backend, dtype, id=f"{device}-{backend}-{str(dtype)[6:]}"))
    return out


def reference_select(before, after, k):
    # Sharpness is defined in fp32 (the op's math precision), so near-ties order as fp32 sees them.
    s = (after.float().cpu() - before.float().cpu()).tolist()
    s = [(-math.inf if math.isnan(v) else v) for v in s]
    return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


@pytest.mark.parametrize("device,backend,dtype", cases("sds_select"))
def test_selects_exactly_k_sharpest(device, backend, dtype):
    gen = torch.Generator().manual_seed(0)
    for batch in batches_for(device, backend):
        before = torch.rand(batch, generator=gen).to(device=device, dtype=dtype)
        after = (before.float() + torch.randn(batch, generator=gen).to(device)).to(dtype)
        for gamma in (0.01, 0.5, 1.0):
            k = ops.sds_k(batch, gamma)
            idx = ops.sds_select(before, after, k, backend=backend)
            assert idx.dtype == torch.int64 and idx.shape == (k,) and idx.device.type == device
            assert idx.tolist() == reference_select(before, after, k)


@pytest.mark.parametrize("device,backend,dtype", cases("sds_select"))
def test_ties_and_nan_are_deterministic(device, backend, dtype):
    before = torch.zeros(10, device=device, dtype=dtype)
    after = torch.tensor([1, 3, 3, float("nan"), 3, 0, 1, float("inf"), -2, 3], device=device, dtype=dtype)
    assert ops.sds_select(before, after, 6, backend=backend).tolist() == [7, 1, 2, 4, 9, 0]
    # Every NaN comes last, in index order.
    after = torch.full((5,), float("nan"), device=device, dtype=dtype)
    after[3] = 1
    assert ops.sds_select(before[:5], after, 5, backend=backend).tolist() == [3, 0, 1, 2, 4]


@pytest.mark.parametrize("device,backend,dtype", cases("sds_select"))
def test_heavy_ties_nan_and_infinities(device, backend, dtype):
    """Few distinct values (ties across kernel tiles), NaN, +-inf and -0.0 mixed: the order is the reference's."""
    gen = torch.Generator().manual_seed(3)
    for batch in (300, 4097):
        values = torch.tensor([0.0, -0.0, 1.0, 2.0, float("nan"), float("inf"), float("-inf")])
        after = values[torch.randint(0, len(values), (batch,), generator=gen)].to(device=device, dtype=dtype)
        before = torch.zeros(batch, device=device, dtype=dtype)
        for k in (1, batch // 3, batch):
            assert ops.sds_select(before, after, k, backend=backend).tolist() == reference_select(before, after, k)


@pytest.mark.parametrize("device,backend,dtype", cases("sds_select")[:1] + [
    c for c in cases("sds_select") if "triton" in c.id and "float32" in c.id])
def test_batches_beyond_one_launch(device, backend, dtype):
    """Above 65536 samples the Triton backend sorts with torch; the result is the same."""
    gen = torch.Generator().manual_seed(4)
    before = torch.rand(65537, generator=gen).to(device=device, dtype=dtype)
    after = torch.rand(65537, generator=gen).to(device=device, dtype=dtype)
    after[5] = float("nan")
    k = ops.sds_k(65537, 0.5)
    assert ops.sds_select(before, after, k, backend=backend).tolist() == reference_select(before, after, k)


@pytest.mark.parametrize("device,backend,dtype", cases("sds_weights"))
def test_weights_are_a_softmax_of_sharpness(device, backend, dtype):
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 33, 4097):
        before = torch.rand(batch, generator=gen).to(device=device, dtype=dtype)
        after = torch.rand(batch, generator=gen).to(device=device, dtype=dtype)
        for t in (0.1, 1.0, 5.0):
            w = ops.sds_weights(before, after, t, backend=backend)
            ref = torch.softmax((after.double() - before.double()).cpu() / t, 0)
            assert w.dtype == torch.float32 and w.shape == (batch,)
            torch.testing.assert_close(w.double().cpu(), ref, rtol=1e-5, atol=1e-7)


def test_validation():
    a = torch.zeros(8)
    with pytest.raises(ValueError, match="k must be"):
        ops.sds_select(a, a, 0)
    with pytest.raises(ValueError, match="k must be"):
        ops.sds_select(a, a, 9)
    with pytest.raises(ValueError, match="k must be"):
        ops.sds_select(a, a, 2.0)
    with pytest.raises(ValueError, match="same length"):
        ops.sds_select(a, torch.zeros(7), 2)
    with pytest.raises(ValueError, match="1-D"):
        ops.sds_select(a.view(2, 4), a.view(2, 4), 2)
    with pytest.raises(ValueError, match="temperature"):
        ops.sds_weights(a, a, 0.0)
    assert ops.sds_k(128, 0.5) == 64 and ops.sds_k(3, 0.1) == 1 and ops.sds_k(10, 1.0) == 10
