"""The CUDA kernels' code, run on the host: index math, element math, Philox, SDS order.

No GPU is needed: tests/csrc/host_emulation.cu compiles the kernel files with their device entry
points left out and runs the same planning and per-thread code through a host executor (every
block, every thread, in turn) on CPU tensors. Each op is compared with the fp64 references of the op
tests and with the torch backend; SWP masks and SDS orders must match the torch backend exactly.
Skipped without nvcc. What this cannot check (device memory model, launch configuration, the SDS
kernel's shared-memory tiling) is covered by the GPU tests in test_cuda_backend.py.
"""

import itertools
import math

import pytest
import torch

from csrc_emulation import emulation_or_skip
from fastsam import ops
from fastsam.ops import _philox
from helpers import DTYPES, assert_close_dtype, randn_list, shape_sets
from test_grad_norm import reference_sq_norm
from test_perturb import reference_perturb
from test_restore_adamw_step import CONFIGS as ADAMW_CONFIGS
from test_restore_adamw_step import reference_adamw
from test_restore_sgd_step import CONFIGS as SGD_CONFIGS
from test_restore_sgd_step import reference_sgd
from test_sds_select import reference_select


@pytest.fixture(scope="module")
def emu():
    return emulation_or_skip()


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose storage starts one element past a 16-byte boundary (the scalar path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def layouts(tensors, how):
    """``how``: "aligned" (as allocated), "misaligned", or "mixed" (every other tensor misaligned)."""
    if how == "aligned":
        return tensors
    return [misaligned(t) if how == "misaligned" or i % 2 else t for i, t in enumerate(tensors)]


# ---------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("depth", [1, 3, 7])
def test_plan_covers_every_element_exactly_once(emu, depth):
    chunk = emu.chunk_size
    gen = torch.Generator().manual_seed(depth)
    numels = [0, 1, chunk - 1, chunk, chunk + 1, 278011, 0, 3 * chunk]
    numels += torch.randint(0, 3000, (2 * emu.max_tensors(depth),), generator=gen).tolist()
    plan = emu.plan(depth, numels).tolist()
    # Global chunk indices run 0..total-1 in launch order: the grad_norm partials are indexed by them.
    assert [row[1] for row in plan] == list(range(len(plan)))
    assert len(plan) == emu.partials_count(numels)
    starts = [sum(numels[:t]) for t in range(len(numels))]
    covered = {t: [] for t in range(len(numels))}
    tensors_per_launch = {}
    for launch, _, tensor, start, length, first_index in plan:
        assert 0 < length <= chunk and start % chunk == 0
        assert first_index == starts[tensor] + start, "SWP counters: bucket index of the chunk's first element"
        covered[tensor].append((start, length))
        tensors_per_launch.setdefault(launch, set()).add(tensor)
    for t, n in enumerate(numels):
        spans = covered[t]
        assert [s for s, _ in spans] == list(range(0, n, chunk)), f"tensor {t}: chunks out of order or missing"
        assert sum(length for _, length in spans) == n
    assert len(tensors_per_launch) > 1, "the list must overflow one launch's metadata"
    assert all(len(ts) <= emu.max_tensors(depth) for ts in tensors_per_launch.values())


# ---------------------------------------------------------------------------------- Philox


def test_philox_matches_the_torch_reference_bit_for_bit(emu):
    counters = [0, 1, 2, 77, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 2 ** 40 + 123, 2 ** 63 - 1]
    counters += torch.randint(0, 2 ** 62, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    for seed in (0, 1, 123456789, 2 ** 32 + 7, 2 ** 63 + 11, 2 ** 64 - 1):
        words, uniforms = emu.philox(seed, counters)
        offsets = torch.tensor([c if c < 2 ** 63 else c - 2 ** 64 for c in counters], dtype=torch.int64)
        assert words == _philox.philox_uint32(seed, offsets).tolist()
        expected = _philox.uniform(seed, offsets)
        assert torch.equal(uniforms.view(torch.int32), expected.view(torch.int32))


# ---------------------------------------------------------------------------------- grad_norm


@pytest.mark.parametrize("mode,eta", [("plain", 0.0), ("adaptive", 0.01), ("fisher", 0.3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_norm(emu, dtype, mode, eta):
    gen = torch.Generator().manual_seed(hash((str(dtype), mode)) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("misaligned", "aligned", "mixed", "mixed")):
        grads = layouts(randn_list(shapes, dtype, "cpu", gen, scale=1.7), how)
        params = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        sq = emu.grad_sq_norm(grads, params, mode, eta)
        torch.testing.assert_close(sq.double(), reference_sq_norm(grads, params, mode, eta), rtol=2e-5, atol=1e-6)


def test_grad_norm_is_deterministic_and_independent_of_alignment(emu):
    """The same values give the same bits wherever they sit in memory (see the element-order note)."""
    gen = torch.Generator().manual_seed(3)
    grads = randn_list([(278011,), (4097,), (33, 7)], torch.float32, "cpu", gen)
    first = emu.grad_sq_norm(grads, [], "plain", 0.0)
    assert torch.equal(emu.grad_sq_norm(grads, [], "plain", 0.0), first)
    assert torch.equal(emu.grad_sq_norm(layouts(grads, "misaligned"), [], "plain", 0.0), first)


def test_grad_norm_propagates_non_finite(emu):
    for bad in (float("inf"), float("nan")):
        grads = [torch.ones(10), torch.ones(70000)]
        grads[1][69999] = bad
        assert not torch.isfinite(emu.grad_sq_norm(grads, [], "plain", 0.0))


def test_grad_norm_over_many_launches(emu):
    gen = torch.Generator().manual_seed(4)
    shapes = [(int(n),) for n in torch.randint(1, 300, (400,), generator=gen)]
    grads = randn_list(shapes, torch.bfloat16, "cpu", gen)
    params = randn_list(shapes, torch.bfloat16, "cpu", gen)
    torch.testing.assert_close(emu.grad_sq_norm(grads, params, "adaptive", 0.1).double(),
                               reference_sq_norm(grads, params, "adaptive", 0.1), rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- perturb


@pytest.mark.parametrize("mode,eta", [("plain", 0.0), ("adaptive", 0.01), ("fisher", 1.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb(emu, dtype, mode, eta):
    gen = torch.Generator().manual_seed(hash((str(dtype), mode, "perturb")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("aligned", "misaligned", "aligned", "mixed")):
        params = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        grads = layouts(randn_list(shapes, dtype, "cpu", gen, scale=0.5), how)
        backups = [torch.empty_like(p) for p in params]
        originals = [p.clone() for p in params]
        norm = reference_sq_norm(grads, params, mode, eta).sqrt()
        emu.perturb_(params, grads, backups, norm.float(), 0.37, mode, eta, 1e-12, 1.0, 0, 0)
        ref = reference_perturb(originals, grads, norm, 0.37, mode, eta, 1e-12)
        for p, b, o, r in zip(params, backups, originals, ref):
            assert torch.equal(b, o)
            assert_close_dtype(p, r, dtype)


@pytest.mark.parametrize("beta", [0.5, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swp_mask_equals_the_torch_backends(emu, dtype, beta):
    """Which elements move must match the torch backend exactly, across tensors, chunks and launches."""
    gen = torch.Generator().manual_seed(17)
    shapes = [(4097,), (300, 7), (1,), (70001,)] + [(int(n),) for n in torch.randint(1, 50, (150,), generator=gen)]
    seed, offset, rho = 2 ** 40 + 99, 1000, 100.0
    params = layouts(randn_list(shapes, dtype, "cpu", gen), "mixed")
    # Unit-size gradients and a large rho: every kept element moves by far more than a rounding step.
    grads = [torch.randint(0, 2, s, generator=gen).to(dtype) * 2 - 1 for s in shapes]
    torch_params = [p.clone() for p in params]
    originals = [p.clone() for p in params]
    norm = ops.grad_norm(grads, backend="torch")
    emu.perturb_(params, grads, [torch.empty_like(p) for p in params], norm, rho, "plain", 0.0, 1e-12, beta, seed,
                 offset)
    ops.perturb_(torch_params, grads, [torch.empty_like(p) for p in params], norm, rho, beta=beta, seed=seed,
                 offset=offset, backend="torch")
    moved = torch.cat([(p != o).flatten() for p, o in zip(params, originals)])
    moved_torch = torch.cat([(p != o).flatten() for p, o in zip(torch_params, originals)])
    keep = _philox.keep_mask(seed, offset, moved.numel(), beta, torch.device("cpu"))
    assert torch.equal(moved, keep)
    assert torch.equal(moved_torch, keep)
    ref = reference_perturb(originals, grads, norm.double(), rho, "plain", 0.0, 1e-12, beta=beta, seed=seed,
                            offset=offset)
    for p, r in zip(params, ref):
        assert_close_dtype(p, r, dtype)


def test_non_finite_norm_writes_the_backup_and_leaves_the_weights(emu):
    gen = torch.Generator().manual_seed(1)
    for bad in (float("inf"), float("nan")):
        params = randn_list([(4097,), (3, 5)], torch.float16, "cpu", gen)
        grads = randn_list([(4097,), (3, 5)], torch.float16, "cpu", gen)
        originals = [p.clone() for p in params]
        backups = [torch.zeros_like(p) for p in params]
        emu.perturb_(params, grads, backups, torch.tensor(bad), 0.05, "plain", 0.0, 1e-12, 0.5, 1, 0)
        for p, b, o in zip(params, backups, originals):
            assert torch.equal(p, o) and torch.equal(b, o)


# ---------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_is_an_exact_copy(emu, dtype):
    gen = torch.Generator().manual_seed(2)
    for shapes, how in zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")):
        params = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        backups = randn_list(shapes, dtype, "cpu", gen)
        emu.restore_(params, backups)
        assert all(torch.equal(p, b) for p, b in zip(params, backups))


# ---------------------------------------------------------------------------------- restore + SGD


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_sgd_step(emu, dtype, config):
    gen = torch.Generator().manual_seed(hash((str(dtype), str(config))) % 2 ** 31)
    for shapes, first, lr_tensor in itertools.product(shape_sets(gen)[1::2], (False, True), (False, True)):
        if first and not config["momentum"]:
            continue
        params = layouts(randn_list(shapes, dtype, "cpu", gen), "mixed")
        backups = randn_list(shapes, dtype, "cpu", gen)
        grads = layouts(randn_list(shapes, dtype, "cpu", gen), "misaligned")
        bufs = randn_list(shapes, dtype, "cpu", gen) if config["momentum"] else []
        old_bufs = [b.clone() for b in bufs]
        emu.restore_sgd_step_(params, grads, backups, bufs, torch.tensor(0.1) if lr_tensor else None,
                              0.0 if lr_tensor else 0.1, config["momentum"], config["dampening"], config["nesterov"],
                              config["weight_decay"], config["maximize"], first, None, None)
        for i, p in enumerate(params):
            w_ref, buf_ref = reference_sgd(backups[i], grads[i], old_bufs[i] if bufs else None, 0.1, first=first,
                                           **config)
            assert_close_dtype(p, w_ref, dtype, factor=4)
            if bufs:
                assert_close_dtype(bufs[i], buf_ref, dtype, factor=4)


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_restore_sgd_step_grad_scale_found_inf_and_self_backup(emu, found):
    gen = torch.Generator().manual_seed(9)
    shapes = [(4097,), (7, 3)]
    params = randn_list(shapes, torch.float32, "cpu", gen)
    grads = randn_list(shapes, torch.float32, "cpu", gen, scale=1024.0)
    bufs = randn_list(shapes, torch.float32, "cpu", gen)
    old = [p.clone() for p in params]
    old_bufs = [b.clone() for b in bufs]
    # Each parameter is its own backup (it was not perturbed): read before written, element by element.
    emu.restore_sgd_step_(params, grads, params, bufs, None, 0.1, 0.9, 0.0, False, 5e-4, False, False,
                          torch.tensor(1024.0), torch.tensor(found))
    for i, p in enumerate(params):
        if found:
            assert torch.equal(p, old[i]) and torch.equal(bufs[i], old_bufs[i])
        else:
            w_ref, buf_ref = reference_sgd(old[i], grads[i], old_bufs[i], 0.1, 0.9, 0.0, False, 5e-4, False, False,
                                           grad_scale=1024.0)
            assert_close_dtype(p, w_ref, torch.float32, factor=4)
            assert_close_dtype(bufs[i], buf_ref, torch.float32, factor=4)


# ---------------------------------------------------------------------------------- restore + AdamW


@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=lambda c: f"b{c['beta1']}-ams{c['amsgrad']}-max{c['maximize']}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_adamw_step(emu, dtype, config):
    gen = torch.Generator().manual_seed(hash((str(dtype), str(config), "adamw")) % 2 ** 31)
    for shapes, step0, step_dtype in ((shape_sets(gen)[1], 0.0, torch.float32),
                                      (shape_sets(gen)[3], 6.0, torch.float64)):
        n = len(shapes)
        params = randn_list(shapes, dtype, "cpu", gen)
        backups = layouts(randn_list(shapes, dtype, "cpu", gen), "mixed")
        grads = randn_list(shapes, dtype, "cpu", gen)
        ms = randn_list(shapes, dtype, "cpu", gen, scale=0.1)
        vs = [x.abs() for x in randn_list(shapes, dtype, "cpu", gen, scale=0.01)]
        vmaxs = [x.abs() for x in randn_list(shapes, dtype, "cpu", gen, scale=0.01)] if config["amsgrad"] else []
        if step0 == 0.0:
            ms, vs, vmaxs = ([torch.zeros_like(x) for x in xs] for xs in (ms, vs, vmaxs))
        olds = [[x.clone() for x in xs] for xs in (ms, vs, vmaxs)]
        steps = [torch.tensor(step0, dtype=step_dtype) for _ in range(n)]
        emu.restore_adamw_step_(params, grads, backups, ms, vs, vmaxs, steps, torch.tensor(1e-2), 0.0,
                                config["beta1"], config["beta2"], config["eps"], config["weight_decay"],
                                config["amsgrad"], config["maximize"], None, None)
        for i in range(n):
            w, m, v, vmax = reference_adamw(backups[i], grads[i], olds[0][i], olds[1][i],
                                            olds[2][i] if config["amsgrad"] else None, step0, 1e-2, **config)
            assert steps[i].item() == step0 + 1
            assert_close_dtype(params[i], w, dtype, factor=4)
            assert_close_dtype(ms[i], m, dtype, factor=4)
            assert_close_dtype(vs[i], v, dtype, factor=4)
            if config["amsgrad"]:
                assert_close_dtype(vmaxs[i], vmax, dtype, factor=4)


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_restore_adamw_step_found_inf_and_many_launches(emu, found):
    gen = torch.Generator().manual_seed(5)
    # More tensors than one launch (and one step-counter launch) holds.
    shapes = [(int(n),) for n in torch.randint(1, 40, (600,), generator=gen)]
    params = randn_list(shapes, torch.float32, "cpu", gen)
    backups = randn_list(shapes, torch.float32, "cpu", gen)
    grads = randn_list(shapes, torch.float32, "cpu", gen, scale=512.0)
    ms = randn_list(shapes, torch.float32, "cpu", gen, scale=0.1)
    vs = [x.abs() for x in randn_list(shapes, torch.float32, "cpu", gen, scale=0.01)]
    olds = [[x.clone() for x in xs] for xs in (ms, vs)]
    steps = [torch.tensor(float(i % 5 + 1)) for i in range(len(shapes))]
    steps0 = [s.item() for s in steps]
    emu.restore_adamw_step_(params, grads, backups, ms, vs, [], steps, None, 1e-2, 0.9, 0.999, 1e-8, 1e-2, False,
                            False, torch.tensor(512.0), torch.tensor(found))
    for i in range(len(shapes)):
        if found:
            assert torch.equal(params[i], backups[i])
            assert torch.equal(ms[i], olds[0][i]) and torch.equal(vs[i], olds[1][i])
            assert steps[i].item() == steps0[i]
        else:
            w, m, v, _ = reference_adamw(backups[i], grads[i], olds[0][i], olds[1][i], None, steps0[i], 1e-2, 0.9,
                                         0.999, 1e-8, 1e-2, False, False, grad_scale=512.0)
            assert steps[i].item() == steps0[i] + 1
            assert_close_dtype(params[i], w, torch.float32, factor=4)
            assert_close_dtype(vs[i], v, torch.float32, factor=4)


# ---------------------------------------------------------------------------------- SDS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sds_select_order(emu, dtype):
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 2, 7, 128, 1000, 4097):
        before = torch.rand(batch, generator=gen).to(dtype)
        after = (before.float() + torch.randn(batch, generator=gen)).to(dtype)
        for gamma in (0.01, 0.5, 1.0):
            k = ops.sds_k(batch, gamma)
            assert emu.sds_select(before, after, k).tolist() == reference_select(before, after, k)


def test_sds_select_ties_nan_infinities_and_signed_zero(emu):
    nan, inf = float("nan"), float("inf")
    before = torch.zeros(12)
    after = torch.tensor([1, 3, 3, nan, 3, 0, 1, inf, -2, 3, -inf, -0.0])
    # -0 ties with +0 (index order), -inf and NaN tie at the end (index order).
    assert emu.sds_select(before, after, 12).tolist() == [7, 1, 2, 4, 9, 0, 6, 5, 11, 8, 3, 10]
    assert emu.sds_select(before, after, 12).tolist() == ops.sds_select(before, after, 12, backend="torch").tolist()
    mixed = emu.sds_select(before.double(), after.half(), 5)  # different dtypes: both compared in fp32
    assert mixed.tolist() == ops.sds_select(before.double(), after.half(), 5, backend="torch").tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sds_weights(emu, dtype):
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 33, 4097):
        before = torch.rand(batch, generator=gen).to(dtype)
        after = torch.rand(batch, generator=gen).to(dtype)
        if batch > 1:
            after[batch // 2] = float("nan")  # weight 0
        for t in (0.1, 1.0, 5.0):
            w = emu.sds_weights(before, after, t)
            s = after.double() - before.double()
            ref = torch.softmax(torch.where(torch.isnan(s), -math.inf, s) / t, 0)
            torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------- grad_mix, ema_direction


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_mix(emu, dtype, swap):
    from test_grad_mix import reference_grad_mix

    gen = torch.Generator().manual_seed(hash((str(dtype), swap, "grad_mix")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")):
        xs = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        ys = randn_list(shapes, dtype, "cpu", gen)
        x0, y0 = [x.clone() for x in xs], [y.clone() for y in ys]
        emu.grad_mix_(xs, ys, torch.tensor(9.0), torch.tensor(-8.0), swap, None)
        ref_x, ref_y = reference_grad_mix(x0, y0, 9.0, -8.0, swap)
        for x, y, rx, ry in zip(xs, ys, ref_x, ref_y):
            assert_close_dtype(x, rx, dtype, factor=17)
            assert_close_dtype(y, ry, dtype, factor=17)
        skipped = [x.clone() for x in xs]
        emu.grad_mix_(xs, ys, torch.tensor(2.0), torch.tensor(1.0), swap, torch.tensor(1.0))
        assert all(torch.equal(x, s) for x, s in zip(xs, skipped))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ema_direction(emu, dtype):
    from test_ema_direction import reference_ema_direction

    gen = torch.Generator().manual_seed(hash((str(dtype), "ema_direction")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")):
        grads = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        momenta = randn_list(shapes, dtype, "cpu", gen)
        g0, m0 = [g.clone() for g in grads], [m.clone() for m in momenta]
        emu.ema_direction_(grads, momenta, 1.0, 0.9, None)
        ref_d, ref_m = reference_ema_direction(g0, m0, 1.0, 0.9)
        for g, m, rd, rm in zip(grads, momenta, ref_d, ref_m):
            assert_close_dtype(g, rd, dtype, factor=2)
            assert_close_dtype(m, rm, dtype, factor=2)
        kept = [m.clone() for m in momenta]
        emu.ema_direction_(grads, momenta, 1.0, 0.9, torch.tensor(1.0))
        assert all(torch.equal(m, k) for m, k in zip(momenta, kept))


# ---------------------------------------------------------------------------------- Momentum-SAM, SAMPa


def _sq(ts) -> float:
    return sum(float((t.double() ** 2).sum()) for t in ts)


@pytest.mark.parametrize("nesterov,wd,mu", [(False, 1e-2, 0.9), (True, 0.0, 0.9), (False, 5e-4, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_sam_sgd(emu, dtype, nesterov, wd, mu):
    from test_momentum_sam_ops import reference_sgd

    gen = torch.Generator().manual_seed(hash((str(dtype), nesterov, mu, "msam_sgd")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")):
        w = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        g = randn_list(shapes, dtype, "cpu", gen)
        v = layouts(randn_list(shapes, dtype, "cpu", gen), "mixed")
        expected = [reference_sgd(a, b, c, 0.07, 0.1, mu, wd, nesterov) for a, b, c in zip(w, g, v)]
        sq = emu.momentum_sam_sgd_(w, g, v, torch.tensor(0.07), 0.1, mu, wd, nesterov)
        for a, b, (ew, ev) in zip(w, v, expected):
            assert_close_dtype(a, ew, dtype, factor=4)
            assert_close_dtype(b, ev, dtype, factor=4)
        assert sq.dtype == torch.float32
        assert math.isclose(float(sq), _sq(v), rel_tol=2e-5), "the norm of the buffers as stored"


@pytest.mark.parametrize("step", [1, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_sam_adamw(emu, dtype, step):
    from test_momentum_sam_ops import reference_adamw

    gen = torch.Generator().manual_seed(hash((str(dtype), step, "msam_adamw")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen)[1::2], ("misaligned", "mixed")):
        w = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        g, m = randn_list(shapes, dtype, "cpu", gen), randn_list(shapes, dtype, "cpu", gen)
        u = layouts([x.abs() for x in randn_list(shapes, dtype, "cpu", gen)], "mixed")
        expected = [reference_adamw(*args, 0.05, 1e-2, 0.9, 0.99, 1e-8, 0.1, step) for args in zip(w, g, m, u)]
        sq = emu.momentum_sam_adamw_(w, g, m, u, torch.tensor(0.05), 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
        for got, want in zip((w, m, u), zip(*expected)):
            for a, e in zip(got, want):
                assert_close_dtype(a, e, dtype, factor=4)
        assert math.isclose(float(sq), _sq(m), rel_tol=2e-5)


def test_momentum_sam_norm_is_deterministic_alignment_free_and_spans_launches(emu):
    """Bitwise the same squared norm wherever the tensors sit; a bucket of more tensors than one launch holds."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(int(n),) for n in torch.randint(1, 300, (400,), generator=gen)] + [(278011,)]
    w, g, v = (randn_list(shapes, torch.float32, "cpu", gen) for _ in range(3))
    runs = []
    for how in ("aligned", "misaligned", "aligned"):
        ws, vs = layouts([x.clone() for x in w], how), layouts([x.clone() for x in v], how)
        runs.append((emu.momentum_sam_sgd_(ws, g, vs, torch.tensor(0.1), 0.1, 0.9, 0.0, False), ws, vs))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][0], runs[2][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1] + runs[0][2], runs[1][1] + runs[1][2]))
    assert math.isclose(float(runs[0][0]), _sq(runs[0][2]), rel_tol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_sam_shift(emu, dtype):
    gen = torch.Generator().manual_seed(hash((str(dtype), "msam_shift")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")):
        w = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        v = randn_list(shapes, dtype, "cpu", gen)
        w0 = [x.clone() for x in w]
        backups = layouts([torch.full_like(x, float("nan")) for x in w], "mixed")
        emu.momentum_sam_shift_(w, v, torch.tensor(-0.3), backups)
        for a, o, b, c in zip(w, w0, backups, v):
            assert torch.equal(b, o)
            assert_close_dtype(a, o.double() - 0.3 * c.double(), dtype)
        moved = [x.clone() for x in w]
        emu.momentum_sam_shift_(w, v, torch.tensor(0.3), [])  # no backups: just the move
        for a, o, c in zip(w, moved, v):
            assert_close_dtype(a, o.double() + 0.3 * c.double(), dtype)


@pytest.mark.parametrize("with_bufs", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampa_extrapolate(emu, dtype, with_bufs):
    from test_sampa_extrapolate import reference_extrapolate

    gen = torch.Generator().manual_seed(hash((str(dtype), with_bufs, "sampa")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")):
        w = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        d = randn_list(shapes, dtype, "cpu", gen)
        bufs = layouts(randn_list(shapes, dtype, "cpu", gen), "misaligned") if with_bufs else []
        w0 = [x.clone() for x in w]
        backups = [torch.full_like(x, float("nan")) for x in w]
        emu.sampa_extrapolate_(w, d, backups, bufs, 0.1, 0.9, 5e-4)
        for i, (a, o, b) in enumerate(zip(w, w0, backups)):
            assert torch.equal(b, o)
            assert_close_dtype(a, reference_extrapolate(o, d[i], bufs[i] if bufs else None, 0.1, 0.9, 5e-4), dtype,
                               factor=2)


# ---------------------------------------------------------------------------------- Bayesian SAM (bSAM)


def _positive(shapes, dtype, gen):
    return [(0.5 + torch.rand(s, generator=gen)).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsam_noise(emu, dtype):
    """Element i of the bucket reads noise[i] (tensor by tensor), whatever the launch and chunk split."""
    gen = torch.Generator().manual_seed(hash((str(dtype), "bsam_noise")) % 2 ** 31)
    sets = shape_sets(gen) + [[(3 * emu.chunk_size + 5,), (7,)] + [(2, 3)] * (emu.max_tensors(3) + 2)]
    for shapes, how in zip(sets, ("mixed", "aligned", "misaligned", "mixed", "mixed")):
        params = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        s = _positive(shapes, dtype, gen)
        backups = [torch.empty_like(p) for p in params]
        noise = torch.randn(sum(p.numel() for p in params), generator=gen)
        w0 = [p.clone() for p in params]
        emu.bsam_noise_(params, backups, s, noise, 300.0)
        start = 0
        for p, b, w, si in zip(params, backups, w0, s):
            n = noise[start:start + p.numel()].view(p.shape).double()
            start += p.numel()
            assert torch.equal(b, w)
            assert_close_dtype(p, w.double() + n / torch.sqrt(300.0 * si.double()), dtype, factor=2)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsam_ascent(emu, dtype, adaptive):
    gen = torch.Generator().manual_seed(hash((str(dtype), adaptive, "bsam_ascent")) % 2 ** 31)
    for shapes, how in zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")):
        params = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        backups, grads = randn_list(shapes, dtype, "cpu", gen), randn_list(shapes, dtype, "cpu", gen)
        s = _positive(shapes, dtype, gen)
        h = layouts([torch.empty_like(p) for p in backups], how)
        emu.bsam_ascent_(params, backups, grads, s, h, 0.3, adaptive)
        for p, hi, w, g, si in zip(params, h, backups, grads, s):
            w64, g64, s64 = w.double(), g.double(), si.double()
            d = w64 * w64 * g64 if adaptive else g64
            assert_close_dtype(p, w64 + 0.3 * d / s64, dtype, factor=2)
            assert_close_dtype(hi, torch.sqrt(s64) * g64.abs(), dtype, factor=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsam_step(emu, dtype):
    gen = torch.Generator().manual_seed(hash((str(dtype), "bsam_step")) % 2 ** 31)
    for (shapes, how), lr in zip(zip(shape_sets(gen), ("mixed", "aligned", "misaligned", "mixed")),
                                 (0.1, torch.tensor(0.1), 0.1, torch.tensor(0.1, dtype=torch.float64))):
        params = layouts(randn_list(shapes, dtype, "cpu", gen), how)
        backups, grads, m = (randn_list(shapes, dtype, "cpu", gen) for _ in range(3))
        s, h = _positive(shapes, dtype, gen), _positive(shapes, dtype, gen)
        m0, s0 = [x.clone() for x in m], [x.clone() for x in s]
        lr_tensor, lr_value = (lr, 0.0) if isinstance(lr, torch.Tensor) else (None, lr)
        emu.bsam_step_(params, backups, grads, m, s, h, lr_tensor, lr_value, 0.9, 0.99, 1e-2, 0.1)
        for p, mi, si, w, g, mo, so, hi in zip(params, m, s, backups, grads, m0, s0, h):
            w64, g64, m64, s64, h64 = (x.double() for x in (w, g, mo, so, hi))
            m_ref = 0.9 * m64 + 0.1 * (g64 + 1e-2 * w64)
            assert_close_dtype(mi, m_ref, dtype, factor=4)
            assert_close_dtype(p, w64 - 0.1 * m_ref / s64, dtype, factor=4)
            assert_close_dtype(si, 0.99 * s64 + 0.01 * (h64 + 0.1 + 1e-2), dtype, factor=4)
