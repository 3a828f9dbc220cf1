"""ASAM as its authors wrote it (SamsungLabs/ASAM): T = |w| + eta only for tensors named "weight";
named parameters in SAM/ASAM."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from helpers import backends_for
from sam_family_reference import run


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def cnn_batches(n=30, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def reference_asam_authors(model, data, rho, eta, lr, momentum, weight_decay):
    """The authors' ascent/descent steps (SamsungLabs/ASAM asam.py), fp64, with torch SGD as the base."""
    model = copy.deepcopy(model).double()
    named = list(model.named_parameters())
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    for x, y in data:
        x = x.double()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            t = {n: (p.abs() + eta if "weight" in n else torch.ones_like(p)) for n, p in named}
            scaled = {n: t[n] * p.grad for n, p in named}
            norm = torch.sqrt(sum((s * s).sum() for s in scaled.values())) + 1e-16
            e = {n: t[n] * scaled[n] * (rho / norm) for n, _ in named}
            for n, p in named:
                p.add_(e[n])
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for n, p in named:
                p.sub_(e[n])
        base.step()
        model.zero_grad()
    return model


def train(model, opt_fn, data, resume_at=None):
    """Two-call SAM steps with a checkpoint round trip at ``resume_at`` (sam_family_reference.run)."""
    return run(model, opt_fn, data, resume_at=resume_at)[0]


def _distance(a, b):
    va = torch.cat([p.detach().double().flatten() for p in a.parameters()])
    vb = torch.cat([p.detach().double().flatten() for p in b.parameters()])
    return ((va - vb).norm() / vb.norm()).item()


KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("backend", backends_for("perturb", "cpu", torch.float32))
def test_asam_weights_rule_matches_the_authors_code_and_resumes(backend):
    # The Triton interpreter is slow on CPU: the kernel backends run a shorter trajectory, no resume.
    model, data = make_cnn(), cnn_batches(30 if backend == "torch" else 8)

    def opt_fn(m):
        return fastsam.ASAM(m.named_parameters(), torch.optim.SGD, rho=0.5, eta=0.01, adaptive_params="weights",
                            perturb_eps=1e-16, backend=backend, **KW)

    reference = reference_asam_authors(model, data, 0.5, 0.01, **KW)
    mine = train(model, opt_fn, data)
    for (n, p), q in zip(mine.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=2e-4, atol=2e-5, msg=n)
    if backend != "torch":
        return
    resumed = train(model, opt_fn, data, resume_at=17)
    for p, q in zip(mine.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # Applying T to every tensor (the default rule) is a visibly different algorithm.
    every = train(model, lambda m: fastsam.ASAM(m.named_parameters(), torch.optim.SGD, rho=0.5, eta=0.01,
                                                perturb_eps=1e-16, backend=backend, **KW), data)
    assert _distance(every, mine) > 0.1  # measured: 0.32 of the weights' norm (0.29 of the distance travelled)


def test_named_parameters_everywhere_and_groups_carry_names():
    model = make_cnn()
    for cls in (fastsam.SAM, fastsam.ASAM, fastsam.WSAM, fastsam.FriendlySAM):
        opt = cls(model.named_parameters(), torch.optim.SGD, lr=0.1)
        assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
        x, y = cnn_batches(1)[0]
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        assert opt.state_dict()["param_groups"][0]["param_names"][0] == "0.weight"


def test_weights_rule_only_changes_non_weight_tensors_geometry():
    """One step: weights move by rho T^2 g / n, biases/BN shifts by rho g / n (the same n)."""
    model = make_cnn()
    opt = fastsam.SAM(model.named_parameters(), torch.optim.SGD, rho=0.3, adaptive=True, eta=0.01,
                      adaptive_params="weights", lr=0.1)
    x, y = cnn_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.clone() for n, p in named.items()}
    t = {n: (before[n].abs() + 0.01 if "weight" in n else torch.ones_like(before[n])) for n in named}
    norm = torch.sqrt(sum(((t[n] * grads[n]) ** 2).sum() for n in named))
    opt.first_step()
    for n, p in named.items():
        torch.testing.assert_close(p.detach() - before[n], 0.3 * t[n] ** 2 * grads[n] / norm, rtol=1e-4, atol=1e-7)
    opt.restore()


def test_weights_rule_needs_names_and_a_known_value():
    model = make_cnn()
    with pytest.raises(ValueError, match="named_parameters"):
        fastsam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive_params="weights")
    with pytest.raises(ValueError, match="adaptive_params"):
        fastsam.ASAM(model.named_parameters(), torch.optim.SGD, lr=0.1, adaptive_params="biases")
    # Without adaptive the rule has nothing to do, so it needs no names.
    fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive_params="weights")
