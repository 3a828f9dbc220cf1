"""GPU-only checks of the compiled backends' device, stream and CUDA-graph handling (issue 18).

Skipped without CUDA (and the first test without two GPUs). What only a GPU shows:

* a bucket on ``cuda:1`` while ``cuda:0`` is current: the Triton kernels must run on GPU 1, on its
  current stream (a side stream, set for cuda:1 only, that also wrote the gradients, with no sync
  in between), and give the torch backend's result; the CUDA extension does the same through its
  CUDAGuard;
* a CUDA graph captured over a whole SAM step whose gradients are set to ``None`` before the
  capture (``zero_grad(set_to_none=True)``): the captured backward allocates new gradients, so the
  Triton pointer tables are built during the capture; replays must equal the eager steps;
* more than ``MAX_CACHED_TABLES`` new tables after a capture: the captured tables are pinned, the
  replay still reads valid pointers.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam import ops

pytestmark = [pytest.mark.gpu]

CUDA_BACKENDS = [b for b in ("triton", "cuda")
                 if torch.cuda.is_available() and ops.supports(b, "perturb", torch.device("cuda"), torch.float32)[0]]


def _model(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_a_bucket_on_the_second_gpu_with_the_first_current(backend):
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.device(dev):
        torch.cuda.set_stream(side)  # cuda:1's current stream; leaving the block makes cuda:0 current again
    try:
        assert torch.cuda.current_device() == 0 and torch.cuda.current_stream(dev) == side
        gen = torch.Generator().manual_seed(0)
        shapes = [(257, 129), (129,), (1,), (10, 4097)]
        params = [torch.randn(s, generator=gen).to(dev) for s in shapes]
        grads = [torch.randn(s, generator=gen).to(dev) * 3 for s in shapes]  # queued on `side`, not synced
        ref_params = [p.clone() for p in params]
        bufs, ref_bufs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        out = {}
        for name, ps, bs in ((backend, params, bufs), ("torch", ref_params, ref_bufs)):
            backups = [torch.empty_like(p) for p in ps]
            norm = ops.grad_norm(grads, backend=name)
            ops.perturb_(ps, grads, backups, norm, 0.1, backend=name)
            perturbed = [p.clone() for p in ps]
            ops.restore_sgd_step_(ps, grads, backups, bs, lr=0.1, momentum=0.9, backend=name)
            out[name] = (norm, perturbed, ps, bs)
        assert torch.cuda.current_device() == 0, "the ops leave the caller's device current"
    finally:
        with torch.cuda.device(dev):
            torch.cuda.set_stream(torch.cuda.default_stream(dev))
    side.synchronize()
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(out[backend][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(out[backend][1:], out["torch"][1:]):
        for a, b in zip(got, want):
            assert a.device == dev
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _full_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                          (torch.optim.AdamW, dict(lr=1e-3))], ids=["sgd", "adamw"])
def test_graph_over_a_full_step_with_gradients_set_to_none(backend, base, base_kw):
    device = torch.device("cuda")
    eager_model = _model(device)
    graphed_model = copy.deepcopy(eager_model)
    eager = fastsam.SAM(eager_model.parameters(), base, backend=backend, rho=0.05, **base_kw)
    graphed = fastsam.SAM(graphed_model.parameters(), base, backend=backend, rho=0.05, **base_kw)
    x = torch.randn(64, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _full_step(graphed_model, graphed, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graphed.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _full_step(graphed_model, graphed, x, y)
    for _ in range(3):
        _full_step(eager_model, eager, x, y)
    for _ in range(4):
        graph.replay()
        _full_step(eager_model, eager, x, y)
    torch.cuda.synchronize()
    for a, b in zip(graphed_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg="replays must follow the eager steps")


def test_more_than_64_tables_after_a_capture_replay_still_correct():
    if "triton" not in CUDA_BACKENDS:
        pytest.skip("the Triton backend is unavailable")
    from fastsam.kernels import _multi_tensor

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    shapes = [(1000,), (33, 7), (1,)]
    params = [torch.zeros(s, device=device) for s in shapes]
    backups = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    scratch = [torch.empty_like(p) for p in params]
    # Warm-up on look-alike tensors: every kernel variant compiled (no compile during the capture),
    # while the tables of the captured grad_norm and perturb are still built during the capture.
    twins = [[torch.randn(s, device=device) for s in shapes] for _ in range(4)]
    ops.restore_(params, backups, backend="triton")
    ops.perturb_(twins[0], twins[1], twins[2], ops.grad_norm(twins[1], backend="triton"), 0.5, backend="triton")
    torch.cuda.synchronize()
    builds = _multi_tensor.table_builds["cuda"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.restore_(params, backups, backend="triton")
        norm = ops.grad_norm(grads, backend="triton")
        ops.perturb_(params, grads, scratch, norm, 0.5, backend="triton")
    assert _multi_tensor.table_builds["cuda"] == builds + 2, "grad_norm's and perturb's tables: built while capturing"
    keep = []
    for i in range(_multi_tensor.MAX_CACHED_TABLES + 10):  # each a new table: the LRU turns over completely
        a, b = torch.randn(5 + i, device=device), torch.randn(5 + i, device=device)
        ops.restore_([a], [b], backend="triton")
        keep.append((a, b))
    torch.cuda.synchronize()
    for round_ in range(3):
        for b in backups:
            b.normal_(generator=None)
        graph.replay()
        torch.cuda.synchronize()
        want_norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
        torch.testing.assert_close(norm.double(), want_norm, rtol=1e-5, atol=0)
        for p, b, g, s in zip(params, backups, grads, scratch):
            assert torch.equal(s, b), "the captured restore wrote the new backups, then perturb backed them up"
            torch.testing.assert_close(p, b + 0.5 * g / (want_norm.float() + 1e-12), rtol=1e-5, atol=1e-6)


# ---- Momentum-SAM and SAMPa on the compiled backends ---------------------------------------------

ONE_PASS = {
    "momentum-sam": lambda ps, b: fastsam.MomentumSAM(ps, lr=0.05, momentum=0.9, weight_decay=1e-2, rho=0.3,
                                                      backend=b),
    "momentum-sam-adamw": lambda ps, b: fastsam.MomentumSAMAdamW(ps, lr=1e-3, rho=1.0, backend=b),
    "sampa": lambda ps, b: fastsam.SAMPa(ps, torch.optim.SGD, rho=0.1, parallel=False, lr=0.05, momentum=0.9,
                                         weight_decay=5e-4, backend=b),
}


def _one_pass_run(name, backend, dtype, steps=6, sync_check=False):
    device = torch.device("cuda")
    model = _model(device).to(dtype)
    opt = ONE_PASS[name](model.parameters(), backend)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(64, 32, generator=gen).to(device, dtype), torch.randint(0, 10, (64,), generator=gen).to(device))
            for _ in range(steps)]
    for x, y in data:
        def closure():
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            return loss

        opt.zero_grad()
        if sync_check:  # Momentum-SAM's step itself, after the backward: no host synchronisation
            closure()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            opt.step(closure)
    torch.cuda.synchronize()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", list(ONE_PASS))
def test_momentum_sam_and_sampa_follow_the_torch_backend_without_host_syncs(name, backend, dtype):
    """The fused Momentum-SAM step (and its norm), the ascent move and SAMPa's extrapolation on the GPU
    kernels: the torch backend's trajectory, bitwise repeatable, and Momentum-SAM's step free of syncs."""
    model, opt = _one_pass_run(name, backend, dtype, sync_check=name != "sampa")
    again, _ = _one_pass_run(name, backend, dtype, sync_check=name != "sampa")
    ref, _ = _one_pass_run(name, "torch", dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, b, c in zip(model.parameters(), again.parameters(), ref.parameters()):
        assert torch.equal(a, b), "deterministic: the same run gives the same bits"
        torch.testing.assert_close(a, c, **tol)


# ------------------------------------------------------------------------------------------------
# Bayesian SAM's ops on the GPU: the torch backend's results (the same noise from the same CUDA
# generator state), no host sync, on the caller's stream; BSAM over each backend follows torch.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bsam_ops_match_the_torch_backend_without_a_host_sync(backend, dtype):
    dev = torch.device("cuda")
    shapes = [(257, 129), (129,), (1,), (10, 4097), (3, 5, 7)]
    tol = {torch.float32: (2e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]
    out = {}
    for name in (backend, "torch"):
        gen = torch.Generator().manual_seed(0)
        w, g1, g2, m = ([torch.randn(s, generator=gen).to(dev, dtype) for s in shapes] for _ in range(4))
        s = [(0.5 + torch.rand(sh, generator=gen)).to(dev, dtype) for sh in shapes]
        backups, h = [torch.empty_like(x) for x in w], [torch.empty_like(x) for x in w]
        noise_gen = torch.Generator(device=dev).manual_seed(5)
        lr = torch.tensor(0.1, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):  # the kernels must queue on the current stream
                ops.bsam_noise_(w, backups, s, 10000, noise_gen, backend=name)
                noisy = [x.clone() for x in w]
                ops.bsam_ascent_(w, backups, g1, s, h, 0.05, True, backend=name)
                ascended = [x.clone() for x in w + h]
                ops.bsam_step_(w, backups, g2, m, s, h, lr=lr, beta1=0.9, beta2=0.999, weight_decay=1e-4,
                               damping=0.1, backend=name)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        side.synchronize()
        out[name] = (noisy, ascended, w, m, s, noise_gen.get_state())
    assert torch.equal(out[backend][5], out["torch"][5]), "one draw of the same size from the same generator"
    for got, want in zip(out[backend][:5], out["torch"][:5]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bsam_over_each_backend_follows_the_torch_backend(backend):
    device = torch.device("cuda")
    x = torch.randn(64, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    results = {}
    for name in (backend, "torch"):
        model = _model(device)
        opt = fastsam.BSAM(model.parameters(), 1000, lr=0.05, seed=3, backend=name)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(10):
            opt.step(closure)
        results[name] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(results[backend], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
