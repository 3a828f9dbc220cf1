"""restore_: an exact in-place copy back into the parameters' own storage."""

import pytest
import torch

from fastsam import ops
from helpers import backend_cases, randn_list, shape_sets


@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore"))
def test_restore_is_exact_and_in_place(device, backend, dtype):
    gen = torch.Generator().manual_seed(2)
    for shapes in shape_sets(gen):
        params = randn_list(shapes, dtype, device, gen)
        backups = randn_list(shapes, dtype, device, gen)
        ptrs = [p.data_ptr() for p in params]
        ops.restore_(params, backups, backend=backend)
        for p, b, ptr in zip(params, backups, ptrs):
            assert torch.equal(p, b)
            assert p.data_ptr() == ptr and p.data_ptr() != b.data_ptr()


@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore", dtypes=[torch.float32]))
def test_restore_non_contiguous_params(device, backend, dtype):
    base = torch.randn(6, 8, device=device)
    params = [base.t(), torch.randn(2, 3, 4, device=device).permute(2, 0, 1)]
    backups = [torch.randn(p.shape, device=device) for p in params]
    ops.restore_(params, backups, backend=backend)
    for p, b in zip(params, backups):
        assert torch.equal(p, b)


def test_restore_rejects_mismatches():
    with pytest.raises(ValueError, match="length"):
        ops.restore_([torch.zeros(2)], [])
    with pytest.raises(ValueError, match="does not match"):
        ops.restore_([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="does not match"):
        ops.restore_([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)])
