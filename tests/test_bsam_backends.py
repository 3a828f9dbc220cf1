"""BSAM over every backend of its ops (torch, Triton, CUDA where they run) against the torch backend.

The noise is drawn with torch by every backend, from the optimizer's generator, so the runs see the
same samples and differ only by the order of fp32 operations; a resume mid-run restores the
generator's state on the kernel backend too.
"""

import pytest
import torch

from helpers import backends_for
from sam_family_reference import assert_models_close, batches, make_mlp
from test_bsam import run_bsam


@pytest.mark.parametrize("backend", backends_for("bsam_step", "cpu", torch.float32))
def test_bsam_every_backend_follows_the_torch_backend(backend):
    model, data = make_mlp(), batches(10)
    reference, ref_opt, ref_losses = run_bsam(model, data, backend="torch")
    if backend == "triton":
        from fastsam.kernels import _multi_tensor

        before = sum(_multi_tensor.launches[f"bsam_{op}_kernel"] for op in ("noise", "ascent", "step"))
    mine, opt, losses = run_bsam(model, data, resume_at=5, backend=backend)
    if backend == "triton":  # the fused kernels ran: one launch per op and step (one bucket here)
        after = sum(_multi_tensor.launches[f"bsam_{op}_kernel"] for op in ("noise", "ascent", "step"))
        assert after - before == 3 * len(data)
    assert_models_close(mine, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for p, q in zip(mine.parameters(), reference.parameters()):
        for key in ("momentum", "precision"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=1e-6)
