"""ESAM (SWP + SDS) against a plain reference written here, over many steps, with resume."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam.ops import _philox
from helpers import backends_for, host_sync_watch

STEPS = 14
RESUME_AT = 6
BATCH = 24


class BNNet(nn.Module):
    """A small MLP with BatchNorm, so that the running statistics are part of what is compared."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32, bias=False)  # a bias before BatchNorm has no gradient (only noise)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.bn(self.fc1(x))))))


def make_model(seed=0):
    torch.manual_seed(seed)
    return BNNet()


def batches(n=STEPS, batch=BATCH, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 10, generator=gen), torch.randint(0, 3, (batch,), generator=gen)) for _ in range(n)]


def groups_of(model, rhos=(0.05, 0.1)):
    """Two groups (weights, then BatchNorm and biases) with their own rho."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and not n.startswith("bn")]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and not n.startswith("bn"))]
    return [dict(params=weights, rho=rhos[0]), dict(params=rest, rho=rhos[1])]


def per_sample_closure(model, x, y):
    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
    return closure


# ------------------------------------------------------------------------------------------------
# The reference: ESAM as the paper and the module docstring define it, one parameter at a time.

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x):
    z = (x + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def step_key(seed, t):
    return splitmix64((seed + t * GOLDEN) & M64) >> 1


def tensor_kept(key, j, beta):
    return beta >= 1 or splitmix64((key + j * GOLDEN) & M64) < beta * 2.0 ** 64


def topk_stable(sharpness, k):
    s = [(-math.inf if math.isnan(v) else v) for v in sharpness.tolist()]
    return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


class ReferenceESAM:
    def __init__(self, groups, base_cls, base_kw, beta, gamma, swp, seed, adaptive=False):
        self.base = base_cls(groups, foreach=False, **base_kw)
        self.beta, self.gamma, self.swp, self.seed, self.adaptive = beta, gamma, swp, seed, adaptive
        self.t = 0

    def params(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    def step(self, model, x, y):
        key = step_key(self.seed, self.t)
        self.t += 1
        kept = {p for j, p in enumerate(self.params()) if self.swp == "element" or tensor_kept(key, j, self.beta)}
        self.base.zero_grad()
        l_before = F.cross_entropy(model(x), y, reduction="none")
        l_before.mean().backward()
        with torch.no_grad():
            # Norm over the gradients that exist: every tensor (element mode) or the kept ones (tensor mode).
            terms = []
            for p in self.params():
                if p in kept:
                    t = (p.abs() * p.grad) if self.adaptive else p.grad
                    terms.append((t * t).sum())
            norm = torch.stack(terms).sum().sqrt()
            backups, offset = {}, 0
            for g in self.base.param_groups:
                for p in g["params"]:
                    if p not in kept:
                        continue
                    d = (p.abs() ** 2 * p.grad) if self.adaptive else p.grad.clone()
                    if self.beta < 1 and self.swp == "element":
                        d = d * _philox.keep_mask(key, offset, p.numel(), self.beta, p.device).view(p.shape)
                    offset += p.numel()
                    backups[p] = p.clone()
                    p.add_(g["rho"] / (norm + 1e-12) / self.beta * d)
        self.base.zero_grad()
        with fastsam.frozen_running_stats(model):
            k = max(1, int(self.gamma * len(y)))
            with torch.no_grad():
                l_after = F.cross_entropy(model(x), y, reduction="none")
            idx = torch.tensor(topk_stable(l_after - l_before.detach(), k))
            F.cross_entropy(model(x[idx]), y[idx], reduction="none").mean().backward()
        with torch.no_grad():
            for p, b in backups.items():
                p.copy_(b)
        self.base.step()
        return l_before.detach().mean()


def run_reference(data, base_cls, base_kw, beta, gamma, swp, seed, adaptive=False):
    model = make_model()
    ref = ReferenceESAM(groups_of(model), base_cls, base_kw, beta, gamma, swp, seed, adaptive)
    losses = [ref.step(model, x, y) for x, y in data]
    return model, losses


def run_esam(data, opt_fn, resume_at=None):
    model = make_model()
    opt = opt_fn(model, seed=1234)
    losses = []
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_model(seed=99)
            model.load_state_dict(ckpt["model"])
            opt = opt_fn(model, seed=777)  # a different seed: the state_dict must carry the generator
            opt.load_state_dict(ckpt["opt"])
        losses.append(opt.step(per_sample_closure(model, x, y)))
    return model, opt, losses


def assert_models_close(a, b, rtol=1e-4, atol=1e-5):
    for (name, ta), tb in zip(list(a.named_parameters()) + list(a.named_buffers()),
                              list(b.parameters()) + list(b.buffers())):
        torch.testing.assert_close(ta.float(), tb.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_models_equal(a, b):
    for (name, ta), tb in zip(list(a.named_parameters()) + list(a.named_buffers()),
                              list(b.parameters()) + list(b.buffers())):
        assert torch.equal(ta, tb), f"{name} differs"


SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
ADAMW_KW = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=1e-2)
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW)}


def esam_backends():
    cpu = torch.device("cpu")
    return [b for b in backends_for("perturb", "cpu", torch.float32)
            if fastsam.ops.supports(b, "sds_select", cpu, torch.float32)[0]]


def _cases():
    for backend in esam_backends():
        for swp in ("element", "tensor"):
            for base in BASES:
                if backend != "torch" and base == "adamw":
                    continue  # the interpreter is slow; the fused AdamW kernel has its own tests
                yield pytest.param(backend, swp, base, id=f"{backend}-{swp}-{base}")


@pytest.mark.parametrize("backend,swp,base", list(_cases()))
def test_matches_reference_and_resumes_exactly(backend, swp, base):
    base_cls, base_kw = BASES[base]
    beta, gamma = (0.5, 0.5) if swp == "element" else (0.6, 0.25)
    data = batches()

    def opt_fn(model, seed):
        return fastsam.ESAM(groups_of(model), base_cls, beta=beta, gamma=gamma, swp=swp, seed=seed, model=model,
                            backend=backend, **base_kw)

    reference, ref_losses = run_reference(data, base_cls, base_kw, beta, gamma, swp, seed=1234)
    straight, opt, losses = run_esam(data, opt_fn)
    resumed, _, resumed_losses = run_esam(data, opt_fn, resume_at=RESUME_AT)
    assert_models_close(straight, reference)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-4, atol=1e-5)
    assert_models_equal(resumed, straight)
    assert all(torch.equal(a, b) for a, b in zip(losses, resumed_losses))
    assert opt.state_dict()["esam_swp_generator"] == {"seed": 1234, "draws": STEPS}
    # BatchNorm statistics: updated by the first pass of each step only.
    assert int(straight.bn.num_batches_tracked) == STEPS


def test_adaptive_matches_reference():
    data = batches(8)
    reference, _ = run_reference(data, torch.optim.SGD, SGD_KW, 0.5, 0.5, "element", seed=5, adaptive=True)
    model = make_model()
    opt = fastsam.ESAM(groups_of(model), torch.optim.SGD, beta=0.5, gamma=0.5, adaptive=True, seed=5, model=model,
                       **SGD_KW)
    for x, y in data:
        opt.step(per_sample_closure(model, x, y))
    assert_models_close(model, reference)


@pytest.mark.parametrize("swp", ["element", "tensor"])
def test_beta_gamma_one_is_exactly_sam(swp):
    data = batches(10)
    sam_model, esam_model = make_model(), make_model()
    sam = fastsam.SAM(groups_of(sam_model), torch.optim.SGD, **SGD_KW)
    esam = fastsam.ESAM(groups_of(esam_model), torch.optim.SGD, beta=1.0, gamma=1.0, swp=swp, model=esam_model,
                        **SGD_KW)
    for x, y in data:
        closure = per_sample_closure(sam_model, x, y)
        sam_loss = closure().mean()
        sam_loss.backward()

        def second():
            with fastsam.frozen_running_stats(sam_model):
                closure().mean().backward()

        sam.step(second)
        sam.zero_grad()
        esam_loss = esam.step(per_sample_closure(esam_model, x, y))
        assert torch.equal(esam_loss, sam_loss.detach())
    assert_models_equal(esam_model, sam_model)


def test_selects_exactly_k_sharpest_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))  # no BatchNorm: k may be 1
    opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, rho=0.5, beta=0.7, gamma=0.3, lr=0.05, model=model)
    for batch in (1, 7, 40):
        x, y = batches(1, batch=batch, seed=batch)[0]
        calls = []

        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            calls.append((indices, torch.is_grad_enabled(), losses.detach().clone()))
            return losses

        opt.step(closure)
        k = max(1, int(0.3 * batch))
        if k == batch:  # nothing to select: no extra forward, the second pass takes the whole batch
            assert [(c[0], c[1]) for c in calls] == [(None, True), (None, True)]
            continue
        (i0, g0, before), (i1, g1, after), (idx, g2, _) = calls
        assert (i0, g0, i1, g1, g2) == (None, True, None, False, True)
        assert idx.dtype == torch.int64 and idx.shape == (k,)
        assert len(set(idx.tolist())) == k
        sharp = after - before
        chosen = torch.zeros(batch, dtype=torch.bool)
        chosen[idx] = True
        assert sharp[chosen].min() >= sharp[~chosen].max()


def test_element_masks_are_reproducible_and_kept_at_rate_beta():
    shapes = [(37, 41), (1,), (4097,), (12, 5, 3)]
    beta = 0.3

    def perturbation(seed):
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = fastsam.ESAM(params, torch.optim.SGD, rho=1.0, beta=beta, seed=seed, lr=0.1)
        deltas = []
        for _ in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.first_step()
            deltas.append(torch.cat([p.detach().flatten().clone() for p in params]))
            opt.restore()
        return opt, deltas

    opt, deltas = perturbation(seed=42)
    _, again = perturbation(seed=42)
    _, other = perturbation(seed=43)
    n = deltas[0].numel()
    scale = 1.0 / math.sqrt(n) / beta  # rho / ||g|| / beta with g = 1 everywhere
    for t, delta in enumerate(deltas):
        mask = _philox.keep_mask(step_key(42, t), 0, n, beta, torch.device("cpu"))
        torch.testing.assert_close(delta, mask.float() * scale)  # the documented Philox stream
        assert torch.equal(delta, again[t])
        assert not torch.equal(delta, other[t])
        rate = mask.float().mean().item()
        assert abs(rate - beta) < 5 * math.sqrt(beta * (1 - beta) / n)
    assert not torch.equal(deltas[0], deltas[1])  # a fresh mask every step
    assert opt.last_swp_draw.seed == step_key(42, 2)


def test_tensor_mode_freezes_unselected_tensors_in_the_first_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    params = list(model.parameters())
    beta = 0.5
    opt = fastsam.ESAM(params, torch.optim.SGD, beta=beta, gamma=0.5, swp="tensor", seed=3, lr=0.01)
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    kept_count = 0
    for t in range(30):
        seen = []

        def closure(indices=None):
            seen.append([p.requires_grad for p in params])
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return (model(xb) - yb).pow(2).mean(1)

        before = [p.detach().clone() for p in params]
        opt.step(closure)
        key = step_key(3, t)
        expected = [tensor_kept(key, j, beta) for j in range(len(params))]
        assert [p in opt.last_swp_draw.selected for p in params] == expected
        assert seen[0] == expected  # first pass: unselected tensors frozen
        assert all(all(s) for s in seen[1:])  # the other passes differentiate everything
        assert all(p.requires_grad for p in params)
        assert all(p.grad is not None for p in params)  # the update uses the full perturbed-point gradient
        assert all(not torch.equal(p, b) for p, b in zip(params, before))
        kept_count += sum(expected)
    n = 30 * len(params)
    assert abs(kept_count / n - beta) < 5 * math.sqrt(beta * (1 - beta) / n)


def test_tensor_mode_restores_requires_grad_when_the_closure_raises():
    model = make_model()
    frozen_before = model.fc3.bias
    frozen_before.requires_grad_(False)  # a tensor the user froze stays frozen
    opt = fastsam.ESAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, beta=0.3, swp="tensor",
                       lr=0.1, seed=0)

    def closure(indices=None):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert [p.requires_grad for p in model.parameters()] == [True] * 6 + [False]


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"), (dict(beta=1.5), "beta"), (dict(beta=-0.1), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(beta=True), "beta"), (dict(beta="0.5"), "beta"),
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.01), "gamma"), (dict(gamma=float("inf")), "gamma"),
    (dict(swp="row"), "swp"), (dict(rho=-1.0), "rho"), (dict(seed=1.5), "seed"),
    (dict(dp_perturbation="both"), "dp_perturbation"), (dict(dp_perturbation="local"), "model="),
])
def test_bad_hyper_parameters_raise(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        fastsam.ESAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def snapshot(model):
    return copy.deepcopy(model.state_dict())


def test_bad_closures_leave_everything_unchanged():
    model = make_model()
    opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model, seed=0)
    x, y = batches(1)[0]
    opt.step(per_sample_closure(model, x, y))
    params_before = [p.detach().clone() for p in model.parameters()]
    opt_before = copy.deepcopy(opt.state_dict())

    def unchanged():
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params_before))
        after = opt.state_dict()
        assert after["esam_swp_generator"] == opt_before["esam_swp_generator"]
        for k, v in opt_before["state"].items():
            assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])
        assert opt._perturbed is None

    with pytest.raises(ValueError, match="per-sample losses"):  # a SAM-style closure (scalar loss)
        opt.step(lambda indices=None: F.cross_entropy(model(x), y))
    unchanged()

    def wrong_length(indices=None):
        losses = per_sample_closure(model, x, y)(indices)
        return losses if indices is None else losses[:-1]

    with pytest.raises(ValueError, match="one loss per selected sample"):
        opt.step(wrong_length)
    unchanged()  # the perturbation was undone and no step was taken
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_two_call_form_gives_swp_without_sds():
    model = make_model()
    opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, beta=0.5, lr=0.1, seed=0)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    moved = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before)])
    assert 0.3 < (moved != 0).float().mean() < 0.7  # about half the weights perturbed
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert opt.state_dict()["esam_swp_generator"]["draws"] == 1


def test_no_host_sync_ops_in_a_step():
    watch = host_sync_watch()
    for swp in ("element", "tensor"):
        model = make_model()
        opt = fastsam.ESAM(model.parameters(), torch.optim.AdamW, swp=swp, lr=1e-3, model=model, seed=0)
        x, y = batches(1)[0]
        for _ in range(2):
            with watch:
                opt.step(per_sample_closure(model, x, y))
    assert watch.seen == []


def test_pickle_round_trip_and_repr():
    model = make_model()
    opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=9, model=model)
    assert "beta=0.5" in repr(opt) and "swp='element'" in repr(opt)
    clone = copy.deepcopy(opt)
    assert clone.state is clone.base_optimizer.state
    assert clone.swp_draw().seed == opt.swp_draw().seed
    assert {id(p) for p in clone.model.parameters()} == {id(p) for g in clone.param_groups for p in g["params"]}


@pytest.mark.gpu
def test_cuda_step_has_no_host_sync():
    model = make_model().cuda()
    opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model, seed=0)
    x, y = (t.cuda() for t in batches(1)[0])
    opt.step(per_sample_closure(model, x, y))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for swp in ("element", "tensor"):
            opt.swp = swp
            opt.step(per_sample_closure(model, x, y))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_tensor_mode_two_call_form_and_an_empty_selection():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)])
    params = list(model.parameters())
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    opt = fastsam.ESAM(params, torch.optim.SGD, beta=0.5, swp="tensor", seed=11, lr=0.1)
    # Two-call form: every gradient exists, but only the drawn tensors move (by rho / beta in total).
    before = [p.detach().clone() for p in params]
    (model(x) - y).pow(2).mean().backward()
    grads = [p.grad.clone() for p in params]
    opt.first_step(zero_grad=True)
    kept = [tensor_kept(step_key(11, 0), j, 0.5) for j in range(len(params))]
    assert 0 < sum(kept) < len(params)
    norm = torch.stack([(g * g).sum() for g, k in zip(grads, kept) if k]).sum().sqrt()
    for p, b, g, k in zip(params, before, grads, kept):
        torch.testing.assert_close(p - b, 0.05 / 0.5 * g / norm if k else torch.zeros_like(p))
    opt.restore()
    # A draw that keeps nothing: the first pass needs no backward, no tensor is perturbed, the step still updates.
    opt = fastsam.ESAM(params, torch.optim.SGD, beta=1e-12, gamma=1.0, swp="tensor", seed=0, lr=0.1)
    opt.step(lambda indices=None: (model(x) - y).pow(2).mean(1))
    assert opt.last_swp_draw.selected == frozenset() and opt._perturbed is None
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
