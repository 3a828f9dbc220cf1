"""sampa_extrapolate_ (SAMPa's ``backup = w; w -= lr (d + wd w + mu buf)``) on every backend.

Each backend against an fp64 per-tensor reference and against the torch backend, on fresh random
inputs of odd sizes, every dtype (fp64 on torch), with and without the momentum buffers and the
weight decay; the backup is an exact copy; non-contiguous layouts; one Triton launch per bucket;
mismatched lists refused by every backend before anything is written.
"""

import pytest
import torch

from fastsam import ops
from helpers import DTYPES, assert_close_dtype, backend_cases, many_shapes, randn_list

SHAPE_SETS = [[(1,)], [(4097,)], [(3, 5), (1,), (70, 3), (4097,), (2, 2, 2)]]
CONFIGS = [dict(momentum=0.9, weight_decay=5e-4, bufs=True), dict(momentum=0.9, weight_decay=0.0, bufs=False),
           dict(momentum=0.0, weight_decay=1e-2, bufs=True), dict(momentum=0.5, weight_decay=0.0, bufs=True)]


def reference_extrapolate(w, d, buf, lr, momentum, weight_decay):
    """fp64, one tensor: the new weights."""
    w, d = w.double().cpu(), d.double().cpu()
    step = d + weight_decay * w
    if buf is not None:
        step = step + momentum * buf.double().cpu()
    return w - lr * step


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("device,backend,dtype", backend_cases("sampa_extrapolate", DTYPES + [torch.float64]))
def test_matches_fp64_reference_and_torch_backend(device, backend, dtype, config):
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), str(config))) % 2 ** 31)
    for shapes in SHAPE_SETS:
        w, d, b = (randn_list(shapes, dtype, device, gen) for _ in range(3))
        bufs = b if config["bufs"] else []
        w0, tw = [x.clone() for x in w], [x.clone() for x in w]
        d0, b0 = [x.clone() for x in d], [x.clone() for x in b]
        backups = [torch.full_like(x, float("nan")) for x in w]
        kw = dict(lr=0.1, momentum=config["momentum"], weight_decay=config["weight_decay"])
        ops.sampa_extrapolate_(w, d, backups, bufs, backend=backend, **kw)
        ops.sampa_extrapolate_(tw, d, [torch.empty_like(x) for x in w], bufs, backend="torch", **kw)
        for i, (a, o, t) in enumerate(zip(w, w0, tw)):
            ref = reference_extrapolate(o, d[i], bufs[i] if bufs else None, **kw)
            assert_close_dtype(a, ref, dtype, factor=2)
            assert_close_dtype(a, t.double(), dtype, factor=2)
        assert all(torch.equal(x, o) for x, o in zip(backups, w0)), "the backup is the weights before the move"
        # Before the fix the torch backend added mu * buf into the directions themselves when weight_decay was 0.
        assert all(torch.equal(x, o) for x, o in zip(d + b, d0 + b0)), "directions and buffers are read-only"


@pytest.mark.parametrize("device,backend,dtype", backend_cases("sampa_extrapolate", [torch.float32]))
def test_non_contiguous_and_restore_is_exact(device, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    w = [torch.randn(40, 30, generator=gen).t().to(device), torch.randn(2, 3, 4, generator=gen).permute(2, 0, 1).to(device)]
    d = [torch.randn(x.shape, generator=gen).to(device) for x in w]
    bufs = [torch.randn(x.shape, generator=gen).to(device) for x in w]
    w0 = [x.clone() for x in w]
    backups = [torch.empty_like(x) for x in w]
    ops.sampa_extrapolate_(w, d, backups, bufs, lr=0.2, momentum=0.5, weight_decay=1e-3, backend=backend)
    for a, o, di, bi in zip(w, w0, d, bufs):
        assert_close_dtype(a, reference_extrapolate(o, di, bi, 0.2, 0.5, 1e-3), dtype)
    ops.restore_(w, backups, backend="torch")
    assert all(torch.equal(a, o) for a, o in zip(w, w0))


triton_cases = [c for c in backend_cases("sampa_extrapolate", [torch.float32]) if c.values[1] == "triton"]


@pytest.mark.parametrize("device,backend,dtype", triton_cases)
def test_one_triton_launch_per_bucket(device, backend, dtype):
    from fastsam.kernels import _multi_tensor

    for n in (3, 30):
        gen = torch.Generator().manual_seed(n)
        shapes = many_shapes(gen, n)
        w, d, b = (randn_list(shapes, dtype, device, gen) for _ in range(3))
        before = _multi_tensor.launches["sampa_extrapolate_kernel"]
        ops.sampa_extrapolate_(w, d, [torch.empty_like(x) for x in w], b, lr=0.1, momentum=0.9, backend=backend)
        assert _multi_tensor.launches["sampa_extrapolate_kernel"] - before == 1


@pytest.mark.parametrize("backend", sorted({c.values[1] for c in backend_cases("sampa_extrapolate", [torch.float32])}))
def test_backends_refuse_mismatched_lists_before_writing(backend):
    from fastsam.ops import _dispatch

    fn = _dispatch.implementations("sampa_extrapolate")[backend]
    w = [torch.zeros(4097), torch.zeros(3, 5)]
    good = [torch.ones(4097), torch.ones(3, 5)]
    for other in ([torch.ones(4097), torch.ones(5, 3)], [torch.ones(4097)]):
        for args in ((w, other, good, good), (w, good, other, good), (w, good, good, other)):
            with pytest.raises(ValueError, match="sampa_extrapolate"):
                fn(*args, 0.1, 0.9, 0.0)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in w)


def test_public_op_refuses_bad_scalars_before_writing():
    w = [torch.zeros(5)]
    for bad in (dict(lr=-1.0), dict(lr=0.1, momentum=float("nan")), dict(lr=0.1, weight_decay=float("inf"))):
        with pytest.raises(ValueError):
            ops.sampa_extrapolate_(w, [torch.ones(5)], [torch.empty(5)], **bad)
    with pytest.raises(ValueError):
        ops.sampa_extrapolate_(w, [torch.ones(4)], [torch.empty(5)], lr=0.1)
    assert torch.equal(w[0], torch.zeros(5))
