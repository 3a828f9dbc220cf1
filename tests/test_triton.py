"""The Triton backend beyond the per-op suites (which already run it against the reference).

* torch.library: ``opcheck`` on every registered op; the ops inside ``torch.compile(fullgraph=True)``.
* The SAM family on ``backend="triton"`` follows the torch backend step for step.
* Multi-tensor launches: a constant number per op whatever the number of tensors; pointer tables
  cached by address; many blocks per tensor, odd layouts, empty and misaligned tensors.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py), so sizes
stay small; the GPU-only checks live in test_triton_gpu.py.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam import ops
from fastsam.ops import _philox
from helpers import assert_close_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK, WHY = ops.supports("triton", "perturb", torch.device(DEVICE), torch.float32)
pytestmark = [pytest.mark.triton, pytest.mark.skipif(not TRITON_OK, reason=f"Triton backend unavailable: {WHY}")]

if TRITON_OK:
    from fastsam.kernels import _multi_tensor


def rand_list(shapes, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(device=DEVICE, dtype=dtype) for s in shapes]


SHAPES = [(5,), (3, 7), (33,), (1,)]


# ------------------------------------------------------------------------------------------------
# torch.library

def _opcheck_cases():
    def steps():
        return [torch.tensor(2.0, device=DEVICE) for _ in SHAPES]

    def pos(seed):
        return [x.abs() for x in rand_list(SHAPES, seed=seed)]

    d = torch.device(DEVICE)
    return {
        "grad_sq_norm_triton": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), "adaptive", 0.1),
        "perturb_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), rand_list(SHAPES, seed=3),
                                    torch.tensor(2.0, device=d), 0.05, "fisher", 1.0, 1e-12, 0.5, 7, 3),
        "restore_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2)),
        "restore_sgd_step_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2),
                                             rand_list(SHAPES, seed=3), rand_list(SHAPES, seed=4), 0.1, None, 0.9,
                                             0.0, True, 1e-4, False, False, torch.tensor(4.0, device=d),
                                             torch.tensor(0.0, device=d)),
        "restore_adamw_step_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2),
                                               rand_list(SHAPES, seed=3), rand_list(SHAPES, seed=4), pos(5), pos(6),
                                               steps(), 0.0, torch.tensor(1e-3, device=d), 0.9, 0.99, 1e-8, 0.01,
                                               True, False, None, None),
        "grad_mix_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), torch.tensor(0.5, device=d),
                                     torch.tensor(-2.0, device=d), True, torch.tensor(0.0, device=d)),
        "ema_direction_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), 1.0, 0.9, None),
        "momentum_sam_sgd_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2),
                                             rand_list(SHAPES, seed=3), torch.tensor(0.1, device=d), 0.1, 0.9, 1e-2,
                                             True),
        "momentum_sam_adamw_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2),
                                               rand_list(SHAPES, seed=3), pos(4), torch.tensor(0.1, device=d), 1e-3,
                                               0.9, 0.999, 1e-8, 1e-2, 3),
        "momentum_sam_shift_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2),
                                               torch.tensor(-0.2, device=d), rand_list(SHAPES, seed=3)),
        "sampa_extrapolate_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2),
                                              rand_list(SHAPES, seed=3), rand_list(SHAPES, seed=4), 0.1, 0.9, 5e-4),
        "bsam_noise_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), pos(3),
                                       torch.randn(sum(torch.Size(s).numel() for s in SHAPES), device=d), 1000.0),
        "bsam_ascent_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), rand_list(SHAPES, seed=3),
                                        pos(4), rand_list(SHAPES, seed=5), 0.05, True),
        "bsam_step_triton_": lambda: (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), rand_list(SHAPES, seed=3),
                                      rand_list(SHAPES, seed=4), pos(5), pos(6), 0.0, torch.tensor(0.1, device=d),
                                      0.9, 0.999, 1e-4, 0.1),
        "sds_select_triton": lambda: (torch.randn(50, device=d), torch.randn(50, device=d), 7),
        "sds_weights_triton": lambda: (torch.randn(50, device=d), torch.randn(50, device=d), 0.5),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    """Schema (declared mutations), fake implementation, autograd registration, AOT dispatch."""
    op = getattr(torch.ops.fastsam, name).default
    result = torch.library.opcheck(op, _opcheck_cases()[name]())
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.isolated  # segfaulted once late in the full suite's process (never alone): see conftest.py
def test_ops_compile_with_fullgraph():
    """A SAM step's optimizer math through the triton ops, compiled with no graph break, equals eager."""

    def sam_math(params, grads, backups, bufs, grads2, before, after):
        norm = ops.grad_norm(grads, backend="triton")
        ops.perturb_(params, grads, backups, norm, 0.05, backend="triton")
        ops.restore_sgd_step_(params, grads2, backups, bufs, lr=0.1, momentum=0.9, backend="triton")
        return (norm, ops.sds_select(before, after, 3, backend="triton"),
                ops.sds_weights(before, after, backend="triton"))

    def state():
        return (rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2), [torch.empty(s, device=DEVICE) for s in SHAPES],
                rand_list(SHAPES, seed=3), rand_list(SHAPES, seed=4), *rand_list([(9,), (9,)], seed=5))

    eager_args, compiled_args = state(), state()
    eager_out = sam_math(*eager_args)
    torch._dynamo.reset()
    compiled_out = torch.compile(sam_math, backend="aot_eager", fullgraph=True)(*compiled_args)
    for a, b in zip(eager_out, compiled_out):
        assert torch.equal(a, b)
    for xs, ys in zip(eager_args[:4], compiled_args[:4]):  # params, grads, backups, momentum buffers
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------
# The optimizers: triton against torch, step for step

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


TRAJECTORIES = {
    # name: (optimizer class, kwargs)
    "sam-sgd-nesterov": (fastsam.SAM, dict(base_optimizer=torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                                           nesterov=True, weight_decay=5e-4)),
    "asam-adamw-amsgrad": (fastsam.ASAM, dict(base_optimizer=torch.optim.AdamW, lr=3e-3, amsgrad=True,
                                              weight_decay=1e-2)),
    "fisher-sgd-dampened": (fastsam.FisherSAM, dict(base_optimizer=torch.optim.SGD, lr=0.05, momentum=0.8,
                                                    dampening=0.1, maximize=False)),
    "sam-adamw-tensor-lr": (fastsam.SAM, dict(base_optimizer=torch.optim.AdamW, rho=0.1, lr=torch.tensor(2e-3),
                                              betas=(0.8, 0.95))),
}


def _train(cls, kwargs, backend, steps=14):
    torch.manual_seed(0)
    model = Net().to(DEVICE)
    opt = cls(model.parameters(), backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 6, generator=gen).to(DEVICE)
        y = torch.randint(0, 3, (16,), generator=gen).to(DEVICE)
        # Every third step the first layer's bias sits out (no gradient): it is neither perturbed nor
        # stepped, which exercises the optimizers' partial paths.
        model.fc1.bias.requires_grad_(i % 3 != 2)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return model, opt


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_optimizer_trajectory_matches_torch_backend(name):
    cls, kwargs = TRAJECTORIES[name]
    ref_model, ref_opt = _train(cls, kwargs, "torch")
    model, opt = _train(cls, kwargs, "triton")
    for (pname, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{pname}: {m}")
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        for field, value in ref_state[k].items():
            torch.testing.assert_close(state[k][field], value, rtol=2e-5, atol=2e-6)


ONE_PASS = {
    # name: (build(params, backend), steps): one-closure optimizers (Momentum-SAM, SAMPa)
    "momentum-sam-sgd": lambda ps, b: fastsam.MomentumSAM(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3,
                                                          backend=b),
    "momentum-sam-nesterov": lambda ps, b: fastsam.MomentumSAM(ps, lr=0.05, nesterov=True, rho=0.1, backend=b),
    "momentum-sam-adamw": lambda ps, b: fastsam.MomentumSAMAdamW(ps, lr=3e-3, weight_decay=1e-2, rho=0.5, backend=b),
    "sampa": lambda ps, b: fastsam.SAMPa(ps, torch.optim.SGD, rho=0.1, parallel=False, lr=0.1, momentum=0.9,
                                         weight_decay=5e-4, backend=b),
}


def _train_one_pass(name, backend, steps=8):
    torch.manual_seed(0)
    model = Net().to(DEVICE)
    opt = ONE_PASS[name](model.parameters(), backend)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 6, generator=gen).to(DEVICE)
        y = torch.randint(0, 3, (16,), generator=gen).to(DEVICE)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    return model, opt


@pytest.mark.parametrize("name", list(ONE_PASS))
def test_momentum_sam_and_sampa_over_triton_match_torch_backend(name):
    """Momentum-SAM's fused step + shift and SAMPa's extrapolation on the Triton kernels, step for step."""
    before = dict(_multi_tensor.launches)
    model, opt = _train_one_pass(name, "triton")
    launched = {k for k, v in _multi_tensor.launches.items() if v != before.get(k, 0)}
    own = {"sampa_extrapolate_kernel"} if name == "sampa" else {"momentum_sam_shift_kernel"} | (
        {"momentum_sam_adamw_kernel"} if "adamw" in name else {"momentum_sam_sgd_kernel"})
    assert own <= launched, launched
    ref_model, ref_opt = _train_one_pass(name, "torch")
    for (pname, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{pname}: {m}")
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    for k in ref_state:
        for field, value in ref_state[k].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(state[k][field], value, rtol=2e-5, atol=2e-6)


def test_the_backend_environment_variable_puts_momentum_sam_on_triton(monkeypatch):
    """``FASTSAM_BACKEND=triton`` with the default ``backend="auto"``: the Triton kernels run."""
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    before = _multi_tensor.launches["momentum_sam_sgd_kernel"]
    model, _ = _train_one_pass("momentum-sam-sgd", "auto", steps=2)
    assert _multi_tensor.launches["momentum_sam_sgd_kernel"] - before == 2
    monkeypatch.delenv(ops.ENV_VAR)
    ref_model, _ = _train_one_pass("momentum-sam-sgd", "torch", steps=2)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# Multi-tensor launches

def test_constant_number_of_launches_whatever_the_number_of_tensors():
    def launches_per_step(n_tensors, base, kw):
        params = [nn.Parameter(t) for t in rand_list([(5, 3)] * n_tensors, seed=n_tensors)]
        opt = fastsam.SAM(params, base, backend="triton", **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.first_step()
        opt.second_step()  # state allocated
        before = dict(_multi_tensor.launches)
        opt.first_step()
        opt.second_step()
        return {k: v - before.get(k, 0) for k, v in _multi_tensor.launches.items() if v != before.get(k, 0)}

    for base, kw in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3))):
        small, large = launches_per_step(3, base, kw), launches_per_step(70, base, kw)
        assert small == large
        assert sum(small.values()) == (5 if base is torch.optim.AdamW else 4), small


@pytest.mark.parametrize("cls", [fastsam.MomentumSAM, fastsam.MomentumSAMAdamW], ids=lambda c: c.__name__)
def test_momentum_sam_launches_per_step_do_not_grow_with_the_number_of_tensors(cls):
    """One fused step (plus its fixed-tree norm) and one ascent move per step, whatever the tensor count."""
    def launches_per_step(n_tensors):
        params = [nn.Parameter(t) for t in rand_list([(5, 3)] * n_tensors, seed=n_tensors)]
        opt = cls(params, backend="triton")
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # state allocated
        before = dict(_multi_tensor.launches)
        opt.step()
        return {k: v - before.get(k, 0) for k, v in _multi_tensor.launches.items() if v != before.get(k, 0)}

    small, large = launches_per_step(3), launches_per_step(70)
    assert small == large, (small, large)
    step_kernel = "momentum_sam_adamw_kernel" if cls is fastsam.MomentumSAMAdamW else "momentum_sam_sgd_kernel"
    assert small == {step_kernel: 1, "sum_partials_kernel": 1, "momentum_sam_shift_kernel": 1}, small


def test_tables_are_cached_by_address():
    params, backups = rand_list(SHAPES, seed=1), rand_list(SHAPES, seed=2)
    ops.restore_(params, backups, backend="triton")
    builds = _multi_tensor.table_builds[torch.device(DEVICE).type]
    for _ in range(3):
        ops.restore_(params, backups, backend="triton")
    assert _multi_tensor.table_builds[torch.device(DEVICE).type] == builds, "same addresses: no new table"
    other = [b.clone() for b in backups]
    ops.restore_(params, other, backend="triton")
    assert _multi_tensor.table_builds[torch.device(DEVICE).type] == builds + 1
    assert all(torch.equal(p, o) for p, o in zip(params, other))


def test_table_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_multi_tensor, "MAX_CACHED_TABLES", 2)
    _multi_tensor.clear_tables()
    keep = []
    for i in range(5):
        params, backups = rand_list(SHAPES, seed=i), rand_list(SHAPES, seed=10 + i)
        keep.append((params, backups))
        ops.restore_(params, backups, backend="triton")
        assert len(_multi_tensor._tables) <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_blocks_many_tensors_odd_layouts(monkeypatch, dtype):
    """Small blocks (many per tensor), empty tensors, a misaligned view, channels_last tensors (walked in
    memory order, or through temporaries for SWP) and a transposed parameter with row-major partners
    (through temporaries): the values equal the torch backend's on contiguous copies, in place."""
    monkeypatch.setattr(_multi_tensor, "INTERPRETER_BLOCK", 64)
    monkeypatch.setattr(_multi_tensor, "BLOCK", 64)

    def make(seed, transposed=False):
        gen = torch.Generator().manual_seed(seed)
        flat = torch.randn(1001, generator=gen).to(device=DEVICE, dtype=dtype)
        square = torch.randn(9, 13, generator=gen).to(device=DEVICE, dtype=dtype)
        return [torch.randn(300, generator=gen).to(device=DEVICE, dtype=dtype),
                torch.empty(0, device=DEVICE, dtype=dtype),
                flat[1:778],  # storage offset of one element: not 16-byte aligned
                torch.randn(4, 5, 3, 3, generator=gen).to(device=DEVICE, dtype=dtype)
                .to(memory_format=torch.channels_last),
                square.t().contiguous().t() if transposed else square,  # column-major vs row-major partners
                torch.randn(7, generator=gen).to(device=DEVICE, dtype=dtype)]

    def run(backend, params, grads, backups, bufs, beta):
        norm = ops.grad_norm(grads, params, mode="adaptive", eta=0.01, backend=backend)
        ops.perturb_(params, grads, backups, norm, 0.2, mode="adaptive", eta=0.01, beta=beta, seed=9, offset=11,
                     backend=backend)
        perturbed = [p.clone() for p in params]
        ops.restore_sgd_step_(params, grads, backups, bufs, lr=0.1, momentum=0.9, weight_decay=1e-3,
                              backend=backend)
        return norm, perturbed, params, bufs

    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-3)}[dtype]
    for beta in (1.0, 0.5):
        odd = [make(1, transposed=True), make(2), make(3), make(4)]
        strides = [[t.stride() for t in xs] for xs in odd]
        contiguous = [[t.clone(memory_format=torch.contiguous_format) for t in xs] for xs in odd]
        got = run("triton", *odd, beta)
        want = run("torch", *contiguous, beta)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for gs, ws in zip(got[1:], want[1:]):
            for a, b in zip(gs, ws):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, check_stride=False)
        assert [[t.stride() for t in xs] for xs in odd] == strides, "updated in place, layouts kept"


def test_swp_counters_beyond_32_bits_and_64_bit_seeds():
    """The Philox counter's high word and the seed's high bits reach the kernel as in the torch generator."""
    shapes = [(1000,), (37, 3)]
    for seed, offset in ((2**63 + 12345, 2**32 - 500), (987654321, 3 * 2**32 + 7)):
        params, grads = rand_list(shapes, seed=1), rand_list(shapes, seed=2)
        originals = [p.clone() for p in params]
        norm = ops.grad_norm(grads, backend="torch")
        ops.perturb_(params, grads, [torch.empty_like(p) for p in params], norm, 0.3, beta=0.4, seed=seed,
                     offset=offset, backend="triton")
        changed = torch.cat([(p != o).flatten().cpu() for p, o in zip(params, originals)])
        expected = _philox.keep_mask(seed, offset, changed.numel(), 0.4, torch.device("cpu"))
        assert torch.equal(changed, expected)
        scale = 0.3 / (norm.double().cpu() + 1e-12) / 0.4
        for p, o, g in zip(params, originals, grads):
            keep = (p != o).cpu()
            assert_close_dtype(p.cpu()[keep], o.double().cpu()[keep] + scale * g.double().cpu()[keep],
                               torch.float32)


def test_bad_inputs_are_rejected_before_anything_changes():
    params, backups = rand_list([(5,), (4,)], seed=1), rand_list([(5,), (3,)], seed=2)
    originals = [p.clone() for p in params]
    with pytest.raises(ValueError, match="does not match its parameter"):
        ops.restore_sgd_step_(params, rand_list([(5,), (4,)]), backups, [], lr=0.1, backend="triton")
    assert all(torch.equal(p, o) for p, o in zip(params, originals))
    steps = [torch.tensor(1, device=DEVICE), torch.tensor(1, device=DEVICE)]
    ms = [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match="step counters"):
        ops.restore_adamw_step_(params, params, [p.clone() for p in params], ms, [m.clone() for m in ms], [], steps,
                                lr=0.1, backend="triton")
    assert all(torch.equal(p, o) for p, o in zip(params, originals))
