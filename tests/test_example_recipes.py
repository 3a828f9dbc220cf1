"""The defining property of each SAM-family recipe in examples/ (SDAT, SAQ, Sharp-MAML, SWA).

The scripts themselves run end to end in tests/test_examples.py; here their functions are imported
and checked on one or a few steps against a direct computation.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import fastsam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdat_perturbation_comes_from_the_task_loss_only():
    sdat = load("sam_sdat")
    xs, ys, xt, _ = sdat.make_domains(n=128)
    results = []
    for trade_off, disc_seed in ((0.0, 1), (5.0, 2)):
        torch.manual_seed(0)
        model = sdat.Net()
        torch.manual_seed(disc_seed)  # a different discriminator too: e must not care
        disc = sdat.make_discriminator()
        disc_before = [p.detach().clone() for p in disc.parameters()]
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)
        disc_opt = torch.optim.SGD(disc.parameters(), lr=0.05)
        # e from the formula: rho * g_task / ||g_task||, over the backbone and head only
        g = torch.autograd.grad(F.cross_entropy(model(xs[:32])[0], ys[:32]), list(model.parameters()))
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        _, e = sdat.sdat_step(model, disc, opt, disc_opt, xs[:32], ys[:32], xt[:32], trade_off)
        for got, gl in zip(e, g):
            torch.testing.assert_close(got, 0.1 * gl / (norm + 1e-12), rtol=1e-5, atol=1e-7)
        moved = any(not torch.equal(a, b) for a, b in zip(disc.parameters(), disc_before))
        assert moved == (trade_off > 0)  # the discriminator steps on its own optimizer, from the 2nd pass
        results.append((e, [p.detach().clone() for p in model.parameters()]))
    (e0, w0), (e1, w1) = results
    assert all(torch.equal(a, b) for a, b in zip(e0, e1)), "e must not depend on the adversarial term"
    assert any(not torch.equal(a, b) for a, b in zip(w0, w1)), "the adversarial term must reach the update"


def test_saq_perturbs_latent_weights_and_quantises_both_passes_on_one_grid(monkeypatch):
    saq = load("sam_saq")
    x, y = saq.make_data(n=256)
    torch.manual_seed(0)
    model = saq.prepare_qat(saq.Net())
    fqs = saq.fake_quantizers(model)
    assert len(fqs) >= 4  # weights and activations of both layers
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    for _ in range(3):
        saq.saq_step(model, opt, x[:64], y[:64])
    grids = []
    original = fastsam.SAM.second_step

    def recording_second_step(self, *args, **kwargs):
        grids.append([(fq.scale.clone(), fq.zero_point.clone()) for fq in fqs])
        return original(self, *args, **kwargs)

    before_first = None

    def recording_first_step(self, *args, **kwargs):
        nonlocal before_first
        before_first = [(fq.scale.clone(), fq.zero_point.clone()) for fq in fqs]
        w = model.fc1.weight.detach().clone()
        out = fastsam.SAM.__dict__["first_step"](self, *args, **kwargs)
        # the latent float weights move by e; the forward then re-quantises them
        assert not torch.equal(model.fc1.weight, w)
        return out

    monkeypatch.setattr(fastsam.SAM, "second_step", recording_second_step)
    monkeypatch.setattr(opt, "first_step", recording_first_step.__get__(opt))
    saq.saq_step(model, opt, x[:64], y[:64])
    for (s0, z0), (s1, z1) in zip(before_first, grids[0]):
        assert torch.equal(s0, s1) and torch.equal(z0, z1), "the second pass must not move the grid"
    assert all(bool(fq.observer_enabled) for fq in fqs)  # observers back on after the step
    # the output at the perturbed point goes through the fake quantiser: Q(w + e) != w + e
    w = model.fc1.weight.detach()
    assert not torch.equal(model.fc1.weight_fake_quant(w), w)


def test_sharp_maml_outer_update_is_the_meta_gradient_at_theta_plus_e():
    maml = load("sam_sharp_maml")
    gen = torch.Generator().manual_seed(0)
    tasks = maml.sample_tasks(4, 5, gen)
    for inner_rho, first_order in ((0.0, False), (0.02, True)):
        torch.manual_seed(0)
        model = maml.make_model()
        theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        names = list(theta)
        # the direct computation: theta - lr * grad M(theta + rho grad M / ||grad M||)
        g = torch.autograd.grad(maml.meta_loss(model, theta, tasks, 0.01, inner_rho, first_order), list(theta.values()))
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        shifted = {n: (theta[n] + 0.05 * gi / (norm + 1e-12)).detach().requires_grad_() for n, gi in zip(names, g)}
        gp = torch.autograd.grad(maml.meta_loss(model, shifted, tasks, 0.01, inner_rho, first_order),
                                 list(shifted.values()))
        expected = {n: theta[n].detach() - 0.1 * gpi for n, gpi in zip(names, gp)}
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        maml.sharp_maml_step(model, opt, tasks, 0.01, inner_rho, first_order)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6)


def test_swa_averages_the_restored_weights_and_anneals_fastsams_groups():
    swa = load("sam_swa")
    snapshots, lrs = [], []

    def on_average(model, optimizer):
        assert optimizer._perturbed is None  # averaged after second_step: never the perturbed weights
        snapshots.append([p.detach().clone() for p in model.parameters()])
        lrs.append(optimizer.base_optimizer.param_groups[0]["lr"])

    model, swa_model, optimizer, (x, _) = swa.train(40, 30, on_average=on_average)
    assert int(swa_model.n_averaged) == len(snapshots) == 10
    for i, p in enumerate(swa_model.module.parameters()):
        torch.testing.assert_close(p.detach(), torch.stack([s[i] for s in snapshots]).mean(0), rtol=1e-5, atol=1e-6)
    # SWALR writes fastsam's param groups, which are the base optimizer's: the base step sees it.
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert lrs[-1] == pytest.approx(0.02) and lrs[0] != pytest.approx(0.02)  # annealed to swa_lr
    # update_bn: the averaged model's BatchNorm statistics are those of its own features.
    with torch.no_grad():
        feats = swa_model.module[0](x)
    bn = swa_model.module[1]
    torch.testing.assert_close(bn.running_mean, feats.mean(0), rtol=1e-4, atol=1e-5)
