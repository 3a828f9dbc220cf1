"""GPU-only checks of the Triton backend (skipped without CUDA; the op suites also run on CUDA there).

* A whole SAM step (SAM/ASAM/Fisher, SGD/AdamW bases, AMP flags) under
  ``torch.cuda.set_sync_debug_mode("error")``: no host synchronisation anywhere in a step.
* A step captured in a CUDA graph and replayed gives what the same steps give eagerly.
* Pointer tables are not rebuilt while the addresses do not change (no host-to-device copies).
* 64-bit indexing: a tensor of more than 2**31 elements.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam import ops

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

CUDA = torch.device("cuda")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(CUDA)


VARIANTS = [(fastsam.SAM, {}), (fastsam.ASAM, {}), (fastsam.FisherSAM, {})]
BASES = [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
         (torch.optim.AdamW, dict(lr=1e-3, amsgrad=True))]


@pytest.mark.parametrize("cls,kw", VARIANTS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("base,base_kw", BASES, ids=lambda v: getattr(v, "__name__", ""))
def test_sam_step_has_no_host_sync(cls, kw, base, base_kw):
    model = _model()
    opt = cls(model.parameters(), base, backend="triton", **kw, **base_kw)
    x = torch.randn(128, 32, device=CUDA)
    y = torch.randint(0, 10, (128,), device=CUDA)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    step()  # warm-up: kernels compiled, optimizer state and pointer tables built
    # The GradScaler path: scale and found-inf flag read on the device by the fused step.
    opt.grad_scale = torch.tensor(1.0, device=CUDA)
    opt.found_inf = torch.tensor(0.0, device=CUDA)
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
        # The remaining ops, SWP included, directly.
        ps = [p.detach() for p in model.parameters()]
        gs = [torch.randn_like(p) for p in ps]
        norm = ops.grad_norm(gs, ps, mode="adaptive", eta=0.01, backend="triton")
        ops.perturb_(ps, gs, [torch.empty_like(p) for p in ps], norm, 0.05, beta=0.5, seed=3, backend="triton")
        loss_before, loss_after = torch.rand(4096, device=CUDA), torch.rand(4096, device=CUDA)
        ops.sds_select(loss_before, loss_after, 2048, backend="triton")
        ops.sds_weights(loss_before, loss_after, 0.5, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _static_setup(base, base_kw, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(257, 129), (129,), (64, 3, 3, 3), (1,), (10, 4097)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(CUDA)) for s in shapes]
    first_grads = [torch.randn(s, generator=gen).to(CUDA) for s in shapes]
    second_grads = [torch.randn(s, generator=gen).to(CUDA) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = fastsam.SAM(params, base, backend="triton", rho=0.1, **base_kw)
    return params, first_grads, second_grads, opt


def _sam_step(params, first_grads, second_grads, opt):
    for p, g in zip(params, first_grads):
        p.grad.copy_(g)
    opt.first_step()
    for p, g in zip(params, second_grads):
        p.grad.copy_(g)
    opt.second_step()


@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
                                          (torch.optim.AdamW, dict(lr="a 0-dim cuda tensor"))],
                         ids=["sgd", "adamw-tensor-lr"])
def test_cuda_graph_capture_and_replay(base, base_kw):
    if isinstance(base_kw["lr"], str):
        base_kw = dict(base_kw, lr=torch.tensor(1e-3, device=CUDA))
    eager = _static_setup(base, base_kw, seed=1)
    graphed = _static_setup(base, base_kw, seed=1)

    # Warm up on a side stream (kernels compiled, state allocated, pointer tables built), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _sam_step(*graphed)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _sam_step(*graphed)
    # Capture records without running: the graphed optimizer has taken 2 steps, as has nothing yet eagerly.
    for _ in range(2):
        _sam_step(*eager)
    for _ in range(5):
        graph.replay()
        _sam_step(*eager)
    torch.cuda.synchronize()
    for a, b in zip(graphed[0], eager[0]):
        assert torch.equal(a, b), "graph replay must equal the eager steps bit for bit"


def test_tables_are_not_rebuilt_in_steady_state():
    from fastsam.kernels import _multi_tensor

    model = _model()
    opt = fastsam.SAM(model.parameters(), torch.optim.AdamW, backend="triton", lr=1e-3)
    x, y = torch.randn(64, 32, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)  # gradients keep their storage, so every address is stable
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
        opt.zero_grad(set_to_none=False)

    step()
    builds = _multi_tensor.table_builds["cuda"]
    for _ in range(3):
        step()
    assert _multi_tensor.table_builds["cuda"] == builds


@pytest.mark.slow
def test_more_than_2_to_the_31_elements():
    """Offsets are 64-bit: a bf16 tensor of 2**31 + 5 elements is restored and perturbed end to end."""
    n = 2 ** 31 + 5
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs about 20 GiB of GPU memory")
    p = torch.zeros(n, dtype=torch.bfloat16, device=CUDA)
    b = torch.ones(n, dtype=torch.bfloat16, device=CUDA)
    ops.restore_([p], [b], backend="triton")
    assert bool(p[-7:].eq(1).all()) and bool(p[:7].eq(1).all())
    g = b  # every gradient element is 1: the norm is sqrt(n)
    norm = ops.grad_norm([g], backend="triton")
    torch.testing.assert_close(norm.cpu(), torch.tensor(float(n) ** 0.5), rtol=1e-4, atol=0)
    del b
    backup = torch.empty_like(p)
    ops.perturb_([p], [g], [backup], norm, 1.0, backend="triton")
    expected = 1.0 + 1.0 / float(n) ** 0.5
    assert torch.allclose(p[-3:].float().cpu(), torch.full((3,), expected).bfloat16().float())
