"""Data-parallel SAM family on 2 CPU processes (gloo): global/local perturbation against one-process runs.

* global SAM (first-pass gradient averaged)    == one-process SAM on the concatenated batch
* local SAM (first pass under no_sync)         == one-process mSAM with one shard per rank
* local MSAM, 2 shards per rank                == one-process mSAM with 4 shards
* global MSAM, 2 shards per rank               == one-process mSAM whose shard k is every rank's shard k
* local / global ESAM (per-rank SDS)          == an ESAM reference written here (per-rank or averaged
                                                 first-pass gradient), ranks' selections averaged

All scenarios run in one spawn of two processes (start-up dominates the cost).
"""

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam.ops import _philox
from gloo_ranks import run_gloo_ranks
from test_esam import step_key, topk_stable
from test_sam import Net

pytestmark = pytest.mark.distributed

WORLD = 2
LOCAL_BATCH = 16
STEPS = 6
KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
ESAM_KW = dict(rho=0.1, beta=0.5, gamma=0.5, seed=77)
SCENARIOS = ("sam-global", "sam-local", "msam-local", "msam-global", "esam-local", "esam-global")


def make_model():
    torch.manual_seed(0)
    return Net()


def global_batches():
    gen = torch.Generator().manual_seed(3)
    n = WORLD * LOCAL_BATCH
    return [(torch.randn(n, 10, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for _ in range(STEPS)]


def closure_for(model, x, y):
    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
    return closure


def run_rank(scenario, rank):
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mode = scenario.split("-")[1]
    if scenario.startswith("sam"):
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, dp_perturbation=mode, **KW)
    elif scenario.startswith("msam"):
        opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=2, dp_perturbation=mode, model=ddp, **KW)
    else:
        opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, dp_perturbation=mode, model=ddp, **ESAM_KW, **KW)
    for x, y in global_batches():
        xr, yr = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        if scenario.startswith("sam"):
            with fastsam.distributed.first_pass(ddp, opt):
                F.cross_entropy(ddp(xr), yr).backward()
            opt.first_step(zero_grad=True)
            with fastsam.distributed.second_pass(ddp):
                F.cross_entropy(ddp(xr), yr).backward()
            opt.second_step(zero_grad=True)
        elif scenario.startswith("msam"):
            opt.step(closure_for(ddp, xr, yr), batch_size=LOCAL_BATCH)
        else:
            opt.step(closure_for(ddp, xr, yr))
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank):
    return {s: run_rank(s, rank) for s in SCENARIOS}


@pytest.fixture(scope="module")
def rank_results():
    return run_gloo_ranks(_worker, world=WORLD)


# ------------------------------------------------------------------------------------------------
# One-process counterparts.

def one_process_sam():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, **KW)
    for x, y in global_batches():
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return list(model.parameters())


def one_process_msam(m, interleave=False):
    model = make_model()
    opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=m, model=model, **KW)
    for x, y in global_batches():
        if interleave:  # shard k = (rank 0's shard k, rank 1's shard k)
            order = torch.arange(len(y)).view(WORLD, m, -1).transpose(0, 1).reshape(-1)
            x, y = x[order], y[order]
        opt.step(closure_for(model, x, y), batch_size=len(y))
    return list(model.parameters())


def rank_slice(x, r):
    return x[r * LOCAL_BATCH:(r + 1) * LOCAL_BATCH]


def reference_esam(local):
    """Each rank: its own (local) or the averaged (global) first-pass gradient for the SWP-masked
    perturbation, its own SDS; the update averages the ranks' perturbed-point gradients."""
    model = make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, foreach=False, **KW)
    beta, gamma, rho = ESAM_KW["beta"], ESAM_KW["gamma"], ESAM_KW["rho"]
    for t, (x, y) in enumerate(global_batches()):
        key = step_key(ESAM_KW["seed"], t)
        total = [torch.zeros_like(p) for p in params]
        first = [torch.autograd.grad(F.cross_entropy(model(rank_slice(x, r)), rank_slice(y, r)), params)
                 for r in range(WORLD)]
        if not local:
            first = [[sum(gs) / WORLD for gs in zip(*first)]] * WORLD
        for r in range(WORLD):
            xr, yr, grads = rank_slice(x, r), rank_slice(y, r), first[r]
            with torch.no_grad():
                before = F.cross_entropy(model(xr), yr, reduction="none")
                norm = torch.stack([(g * g).sum() for g in grads]).sum().sqrt()
                backups, offset = [p.clone() for p in params], 0
                for p, g in zip(params, grads):
                    mask = _philox.keep_mask(key, offset, p.numel(), beta, p.device).view(p.shape)
                    p.add_(rho / (norm + 1e-12) / beta * g * mask)
                    offset += p.numel()
                after = F.cross_entropy(model(xr), yr, reduction="none")
            idx = torch.tensor(topk_stable(after - before, max(1, int(gamma * LOCAL_BATCH))))
            grads = torch.autograd.grad(F.cross_entropy(model(xr[idx]), yr[idx], reduction="none").mean(), params)
            with torch.no_grad():
                for tot, g, p, b in zip(total, grads, params, backups):
                    tot += g / WORLD
                    p.copy_(b)
        for p, tot in zip(params, total):
            p.grad = tot
        base.step()
    return params


def assert_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-4, atol=1e-5)


def test_ranks_stay_identical(rank_results):
    r0, r1 = rank_results
    for s in SCENARIOS:
        assert all(torch.equal(a, b) for a, b in zip(r0[s], r1[s])), s


def test_global_sam_equals_one_process_sam_on_the_whole_batch(rank_results):
    assert_close(rank_results[0]["sam-global"], one_process_sam())


def test_local_sam_equals_one_process_msam_with_a_shard_per_rank(rank_results):
    local = rank_results[0]["sam-local"]
    assert_close(local, one_process_msam(WORLD))
    # and it is not global SAM (the test would be vacuous otherwise)
    assert max((a - b).abs().max().item() for a, b in zip(local, rank_results[0]["sam-global"])) > 1e-4


def test_local_msam_equals_one_process_msam_with_every_shard(rank_results):
    assert_close(rank_results[0]["msam-local"], one_process_msam(2 * WORLD))


def test_global_msam_averages_each_shard_across_ranks(rank_results):
    assert_close(rank_results[0]["msam-global"], one_process_msam(2, interleave=True))


@pytest.mark.parametrize("mode", ["local", "global"])
def test_esam_equals_the_reference(rank_results, mode):
    assert_close(rank_results[0][f"esam-{mode}"], reference_esam(local=mode == "local"))


def test_helpers_are_no_ops_without_ddp():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, dp_perturbation="local", lr=0.1)
    with fastsam.distributed.first_pass(model, opt):
        F.cross_entropy(model(torch.randn(4, 10)), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="dp_perturbation"):
        fastsam.SAM(model.parameters(), torch.optim.SGD, dp_perturbation="sometimes", lr=0.1)
