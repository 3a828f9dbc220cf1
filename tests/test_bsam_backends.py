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


@pytest.mark.parametrize("backend", backends_for("bsam_step", "cpu", torch.float32))
def test_bsam_no_host_sync_and_work_per_step_independent_of_tensor_count(backend):
    """Dispatched ops (and, on Triton, kernel launches) per step are the same for 6 and 120 tensors,
    and none of them syncs with the host."""
    from collections import Counter

    import torch.nn as nn

    import fastsam
    from helpers import SYNC_OPS, op_counter
    from test_bsam import HP, NUM_DATA

    def launches():
        if backend != "triton":
            return Counter()
        from fastsam.kernels import _multi_tensor

        return Counter(_multi_tensor.launches)

    def count(n):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(n)]
        opt = fastsam.BSAM(params, NUM_DATA, backend=backend, **HP)

        def fill():
            counter.paused = True
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            counter.paused = False

        counter = op_counter(skip_views=True)
        for _ in range(2):  # warm-up: the kernels' pointer tables are built on first use
            opt.first_step()
            fill()
            opt.second_step()
            fill()
            opt.third_step()
        before = launches()
        with counter:
            opt.first_step()
            fill()
            opt.second_step()
            fill()
            opt.third_step()
        return counter.ops, launches() - before

    ops6, launches6 = count(6)
    ops120, launches120 = count(120)
    assert ops6 == ops120
    assert launches6 == launches120
    assert not [op for op in ops120 if any(s in op for s in SYNC_OPS)], ops120
    if backend == "triton":
        assert launches6 == Counter({"bsam_noise_kernel": 1, "bsam_ascent_kernel": 1, "bsam_step_kernel": 1})
        # The noise: one draw per bucket; the other ops build the pointer tables of the new .grad tensors
        # (fill() allocates them anew each step), a fixed number per bucket.
        assert ops6["aten.randn.generator"] == 1, ops6
