"""The cuda backend on a GPU: no host syncs, CUDA-graph capture, torch.compile, opcheck, fallbacks.

The numerics of every op on CUDA tensors are covered by the op tests (tests/test_<op>.py pick up the
cuda backend through helpers.backend_cases once the extension loads); this file checks what only a
GPU can show. Every test here is marked ``gpu`` and skipped without CUDA (or without the extension,
with the reason ``fastsam info`` would print).
"""

import pytest
import torch

import fastsam
from fastsam import _extension, ops
from fastsam.ops import _cuda_common, _philox

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ok, why = _extension.status()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")


def bucket(shapes, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", generator=gen, dtype=torch.float32).mul_(scale).to(dtype) for s in shapes]


SHAPES = [(4097,), (64, 3, 3, 3), (1,), (278011,), (7, 13)]


def sam_family_step(dtype, lr):
    """One SAM step's ops on the cuda backend: norm, perturb (SWP), restore + SGD, restore + AdamW, SDS."""
    p, g = bucket(SHAPES, dtype, 1), bucket(SHAPES, dtype, 2, 1e-2)
    backups = [torch.empty_like(x) for x in p]
    bufs, m, v = bucket(SHAPES, dtype, 3), bucket(SHAPES, dtype, 4, 0.1), [x.abs() for x in bucket(SHAPES, dtype, 5)]
    steps = [torch.zeros((), device="cuda") for _ in SHAPES]
    found = torch.zeros((), device="cuda")
    scale = torch.full((), 2.0, device="cuda")

    def run():
        norm = ops.grad_norm(g, p, mode="adaptive", eta=0.01, backend="cuda")
        ops.perturb_(p, g, backups, norm, 0.05, mode="adaptive", eta=0.01, beta=0.5, seed=7, backend="cuda")
        ops.restore_(p, backups, backend="cuda")
        ops.perturb_(p, g, backups, norm, 0.05, mode="adaptive", eta=0.01, backend="cuda")
        ops.restore_sgd_step_(p, g, backups, bufs, lr=lr, momentum=0.9, weight_decay=5e-4, grad_scale=scale,
                              found_inf=found, backend="cuda")
        ops.perturb_(p, g, backups, norm, 0.05, backend="cuda")
        ops.restore_adamw_step_(p, g, backups, m, v, [], steps, lr=lr, grad_scale=scale, found_inf=found,
                                backend="cuda")
        before, after = torch.rand(512, device="cuda"), torch.rand(512, device="cuda")
        return norm, ops.sds_select(before, after, 128, backend="cuda"), ops.sds_weights(before, after,
                                                                                           backend="cuda")

    return run, p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_host_sync(dtype):
    lr = torch.tensor(0.1, device="cuda")
    run, _ = sam_family_step(dtype, lr)
    run()  # first call: library loading, allocator warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_sam_step_without_host_sync(base):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).cuda()
    opt = fastsam.SAM(model.parameters(), base, lr=torch.tensor(0.01, device="cuda"), backend="cuda")
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_ops_capture_in_a_cuda_graph_and_replay_like_eager():
    lr = torch.tensor(0.1, device="cuda")
    run_eager, p_eager = sam_family_step(torch.float32, lr)
    run_graph, p_graph = sam_family_step(torch.float32, lr)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        run_eager()
        run_graph()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_graph()
    for _ in range(3):
        graph.replay()
        eager = run_eager()
    torch.cuda.synchronize()
    for a, b in zip(p_graph, p_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(captured[0], eager[0], rtol=0, atol=0)


def test_torch_compile_traces_the_ops():
    p, g = bucket(SHAPES, torch.float32, 1), bucket(SHAPES, torch.float32, 2, 1e-2)
    p_ref = [x.clone() for x in p]
    backups, backups_ref = [torch.empty_like(x) for x in p], [torch.empty_like(x) for x in p]

    def perturb_and_norm(params, grads, backups):
        norm = ops.grad_norm(grads, backend="cuda")
        ops.perturb_(params, grads, backups, norm, 0.05, beta=0.5, seed=3, backend="cuda")
        return norm

    compiled = torch.compile(perturb_and_norm)
    n1 = compiled(p, g, backups)
    n2 = perturb_and_norm(p_ref, g, backups_ref)
    torch.testing.assert_close(n1, n2, rtol=0, atol=0)
    for a, b in zip(p + backups, p_ref + backups_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_on_cuda():
    p, g, b, m = (bucket([(257,), (3, 5)], torch.float32, s) for s in range(4))
    v, vm = ([x.abs() for x in bucket([(257,), (3, 5)], torch.float32, s)] for s in (5, 6))
    steps = [torch.tensor(2.0, device="cuda") for _ in range(2)]
    before, after = torch.rand(64, device="cuda"), torch.rand(64, device="cuda")
    cases = {
        "grad_sq_norm": (g, p, "fisher", 0.5),
        "perturb_": (p, g, b, torch.tensor(3.0, device="cuda"), 0.05, "plain", 0.0, 1e-12, 0.5, 3, 11),
        "restore_": (p, b),
        "restore_sgd_step_": (p, g, b, m, torch.tensor(0.1, device="cuda"), 0.0, 0.9, 0.0, True, 1e-4, False, False,
                              None, torch.zeros((), device="cuda")),
        "restore_adamw_step_": (p, g, b, m, v, vm, steps, None, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True, False,
                                torch.tensor(4.0, device="cuda"), None),
        "sds_select": (before, after, 10),
        "sds_weights": (before, after, 2.0),
        # layer-wise perturbation (AWP / WT-AWP / HERO)
        "per_tensor_sq_norms": (g,),
        "perturb_per_tensor_": (p, g, b, torch.tensor([0.5, float("nan")], device="cuda")),
    }
    for name, args in cases.items():
        torch.library.opcheck(_cuda_common.op(name), args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swp_mask_is_the_same_on_every_backend(dtype):
    p = bucket(SHAPES, dtype, 1)
    g = [torch.ones_like(x) for x in p]
    norm = ops.grad_norm(g, backend="torch")
    masks = {}
    for backend in ops.BACKENDS:
        if not ops.supports(backend, "perturb", torch.device("cuda"), dtype)[0]:
            continue
        w = [x.clone() for x in p]
        ops.perturb_(w, g, [torch.empty_like(x) for x in w], norm, 100.0, beta=0.3, seed=2 ** 40 + 1, offset=5,
                     backend=backend)
        masks[backend] = torch.cat([(a != b).flatten() for a, b in zip(w, p)]).cpu()
    expected = _philox.keep_mask(2 ** 40 + 1, 5, masks["cuda"].numel(), 0.3, torch.device("cpu"))
    for backend, mask in masks.items():
        assert torch.equal(mask, expected), backend


def test_unsupported_layouts_fall_back_to_torch():
    w = torch.randn(8, 4, 5, 5, device="cuda").to(memory_format=torch.channels_last)
    g = torch.randn_like(w)  # channels_last too
    ref, b1, b2 = w.clone(), torch.empty_like(w), torch.empty_like(w)
    norm = ops.grad_norm([g], backend="cuda")
    ops.perturb_([w], [g], [b1], norm, 0.1, beta=0.5, seed=1, backend="cuda")  # SWP needs row-major: fallback
    ops.perturb_([ref], [g], [b2], norm, 0.1, beta=0.5, seed=1, backend="torch")
    assert torch.equal(w, ref) and torch.equal(b1, b2)
    # Without SWP, a channels_last bucket runs in the kernels (same strides everywhere).
    w2, ref2 = w.clone(), w.clone()
    ops.perturb_([w2], [g], [torch.empty_like(w)], norm, 0.1, backend="cuda")
    ops.perturb_([ref2], [g], [torch.empty_like(w)], norm, 0.1, backend="torch")
    torch.testing.assert_close(w2, ref2)


def test_sds_select_beyond_one_launch_falls_back():
    before, after = torch.rand(70000, device="cuda"), torch.rand(70000, device="cuda")
    assert torch.equal(ops.sds_select(before, after, 1000, backend="cuda"),
                       ops.sds_select(before, after, 1000, backend="torch"))


def test_sds_select_at_the_one_launch_limit_with_ties():
    before = torch.zeros(65536, device="cuda")
    after = torch.randint(0, 50, (65536,), device="cuda").float()  # many ties
    after[::97] = float("nan")
    for k in (1, 6553, 65536):
        assert torch.equal(ops.sds_select(before, after, k, backend="cuda"),
                           ops.sds_select(before, after, k, backend="torch"))


def test_grad_norm_is_bitwise_deterministic():
    g = bucket([(10_000_019,), (4097,), (3, 3)], torch.bfloat16, 9)
    first = ops.grad_norm(g, backend="cuda")
    for _ in range(5):
        assert torch.equal(ops.grad_norm(g, backend="cuda"), first)
