"""fastsam.sharpness against known answers: quadratics with a chosen spectrum, closed-form ball maxima."""

import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsam import sharpness as fs


def rotation(n, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def spd(spectrum, seed=0):
    q = rotation(len(spectrum), seed)
    return q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T


class Quadratic(nn.Module):
    """Per-sample loss ``s_i * 0.5 (w - c)^T A (w - c)``; with ``s = 1`` the loss is the plain quadratic."""

    def __init__(self, A, w, c=None):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("c", torch.zeros_like(w) if c is None else c)
        self.w = nn.Parameter(w.clone())

    def forward(self, x):  # x: (n, 1) weights s_i
        d = self.w - self.c
        return x[:, 0] * (0.5 * d @ self.A @ d)


class ShiftedQuadratic(nn.Module):
    """Per-sample loss ``0.5 (w - x_i)^T A (w - x_i)``: each shard has its own gradient ``A (w - mean x_S)``."""

    def __init__(self, A, w):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        d = self.w - x
        return 0.5 * ((d @ self.A) * d).sum(1)


def mean_loss(out, y):
    return out.mean()


def ball_max(g, A, rho):
    """max_{||d|| <= rho} g.d + 0.5 d^T A d for PSD A, in closed form (secular equation, fp64)."""
    lam, q = torch.linalg.eigh(A)
    b = q.T @ g
    lmax = float(lam[-1])
    if float(b.norm()) < 1e-300:
        return 0.5 * rho ** 2 * lmax

    def norm_d(mu):
        return float(torch.sqrt(((b / (mu - lam)) ** 2).sum()))

    lo, hi = lmax + 1e-300, lmax + float(b.norm()) / rho + 1.0
    while norm_d(hi) > rho:
        hi = lmax + 2 * (hi - lmax)
    for _ in range(400):  # ||d(mu)|| decreases in mu > lambda_max
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm_d(mid) > rho else (lo, mid)
    mu = 0.5 * (lo + hi)
    d = q @ (b / (mu - lam))
    return float(g @ d + 0.5 * d @ A @ d)


def weight_batches(s, sizes):
    """Loader of uneven batches of per-sample weights s (x) with dummy targets."""
    out, i = [], 0
    for n in sizes:
        out.append((s[i:i + n, None], torch.zeros(n)))
        i += n
    return out


SPECTRUM = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]


# ---------------------------------------------------------------------------------------- Hessian


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenvalues_of_a_quadratic_with_chosen_spectrum(method):
    A = spd(SPECTRUM, seed=1)
    model = Quadratic(A, torch.randn(6, dtype=torch.float64))
    data = (torch.ones(8, 1, dtype=torch.float64), torch.zeros(8))
    vals, vecs = fs.hessian_eigenvalues(model, mean_loss, data, k=3, method=method, tol=1e-12, max_iter=500,
                                        return_vectors=True)
    assert vals == pytest.approx(SPECTRUM[:3], rel=1e-6, abs=0)
    q = rotation(6, 1)
    for i, v in enumerate(vecs):  # the eigenvectors too, up to sign
        assert abs(float(v[0] @ q[:, i])) == pytest.approx(1.0, abs=1e-6)
        assert float(v[0].norm()) == pytest.approx(1.0, abs=1e-9)


def test_lanczos_gives_the_largest_not_the_largest_magnitude():
    """An indefinite Hessian (a saddle): Lanczos returns the largest eigenvalues, power iteration |largest|."""
    spectrum = [2.0, 1.0, 0.3, -0.5, -4.0]
    A = spd(spectrum, seed=9)
    model = Quadratic(A, torch.randn(5, dtype=torch.float64))
    data = (torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))
    assert fs.hessian_eigenvalues(model, mean_loss, data, k=2) == pytest.approx([2.0, 1.0], rel=1e-6)
    power = fs.hessian_eigenvalues(model, mean_loss, data, k=1, method="power", tol=1e-12, max_iter=500)
    assert power == pytest.approx([-4.0], rel=1e-6)


def test_lanczos_converges_on_a_large_spectrum_within_few_products():
    """200 parameters, 60 products: the top 3 of a spectrum with a clear gap to 1e-6."""
    spectrum = [10.0, 8.0, 6.0] + torch.linspace(0.0, 3.0, 197).tolist()
    q = rotation(200, 10)
    A = q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T
    model = Quadratic(A, torch.zeros(200, dtype=torch.float64))
    data = (torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))
    calls = []

    def counting(out, y):
        calls.append(1)
        return out.mean()

    vals = fs.hessian_eigenvalues(model, counting, data, k=3, max_iter=60, tol=1e-10)
    assert vals == pytest.approx([10.0, 8.0, 6.0], rel=1e-6)
    assert len(calls) <= 60


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenvalues_over_an_uneven_loader_weight_batches_by_size(method):
    """The Hessian of the mean over samples: batches of 3, 5 and 1 samples weigh 3, 5 and 1."""
    A = spd(SPECTRUM, seed=2)
    s = torch.linspace(0.5, 2.0, 9, dtype=torch.float64) ** 2
    model = Quadratic(A, torch.randn(6, dtype=torch.float64))
    loader = weight_batches(s, [3, 5, 1])
    vals = fs.hessian_eigenvalues(model, mean_loss, loader, k=2, method=method, tol=1e-12, max_iter=500)
    expected = [float(s.mean()) * lam for lam in SPECTRUM[:2]]
    assert vals == pytest.approx(expected, rel=1e-6, abs=0)
    # max_batches=1 uses the first batch only
    first = fs.hessian_eigenvalues(model, mean_loss, loader, k=1, method=method, tol=1e-12, max_iter=500,
                                   max_batches=1)
    assert first[0] == pytest.approx(float(s[:3].mean()) * SPECTRUM[0], rel=1e-6)


def test_trace_of_a_diagonal_quadratic_is_exact():
    A = torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64))
    model = Quadratic(A, torch.randn(6, dtype=torch.float64))
    data = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4))
    assert fs.hessian_trace(model, mean_loss, data) == pytest.approx(sum(SPECTRUM), rel=1e-6)


def test_trace_of_a_rotated_quadratic_within_its_known_standard_error():
    A = spd(SPECTRUM, seed=3)
    model = Quadratic(A, torch.randn(6, dtype=torch.float64))
    data = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4))
    n = 200
    est = fs.hessian_trace(model, mean_loss, data, max_iter=n, tol=0.0)
    off = A - torch.diag(torch.diag(A))
    sigma = math.sqrt(2 * float((off ** 2).sum()) / n)  # Var(v^T A v) = 2 sum_{i != j} A_ij^2 (Rademacher)
    assert abs(est - sum(SPECTRUM)) < 4 * sigma
    # fixed seed: the same estimate again, a different one with another seed
    assert fs.hessian_trace(model, mean_loss, data, max_iter=n, tol=0.0) == est
    assert fs.hessian_trace(model, mean_loss, data, max_iter=n, tol=0.0, seed=1) != est


def test_trace_stops_at_tolerance():
    A = spd(SPECTRUM, seed=3)
    model = Quadratic(A, torch.randn(6, dtype=torch.float64))
    data = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4))
    calls = []

    def counting(out, y):
        calls.append(1)
        return out.mean()

    fs.hessian_trace(model, counting, data, max_iter=500, tol=0.2)
    assert 2 <= len(calls) < 500


# ---------------------------------------------------------------------------------------- m-sharpness


@pytest.mark.parametrize("rho", [0.05, 0.7])
def test_m_sharpness_at_the_minimum_is_half_rho_squared_lambda_max(rho):
    A = spd(SPECTRUM, seed=4)
    model = Quadratic(A, torch.zeros(6, dtype=torch.float64))
    data = (torch.ones(12, 1, dtype=torch.float64), torch.zeros(12))
    res = fs.m_sharpness(model, mean_loss, data, rho=rho, m=4, steps=60)
    assert res.mean == pytest.approx(0.5 * rho ** 2 * SPECTRUM[0], rel=1e-6)
    assert res.std < 1e-6 * res.mean and len(res.values) == 3  # equal shards (fp32 norms)
    mean, std = res  # unpacks as (mean, std)
    assert mean == res.mean and std == res.std


def test_m_sharpness_without_random_start_is_zero_at_a_stationary_point():
    A = spd(SPECTRUM, seed=4)
    model = Quadratic(A, torch.zeros(6, dtype=torch.float64))
    data = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4))
    assert fs.m_sharpness(model, mean_loss, data, rho=0.3, m=4, random_start=False).mean == 0.0


def test_m_sharpness_averages_the_closed_form_max_over_disjoint_shards():
    """Each m-shard has its own gradient; the result is the mean of the shards' exact ball maxima."""
    A = spd(SPECTRUM, seed=5)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.randn(22, 6, generator=gen, dtype=torch.float64)  # 22 samples, m=5: 4 shards, 2 dropped
    loader = [(x[:13], torch.zeros(13)), (x[13:], torch.zeros(9))]  # shards never straddle batches
    model = ShiftedQuadratic(A, w)
    rho, m = 0.4, 5
    shards = [x[0:5], x[5:10], x[13:18]]  # batch 1: 2 shards (3 left), batch 2: 1 shard (4 left)
    expected = [ball_max(A @ (w - s.mean(0)), A, rho) for s in shards]
    res = fs.m_sharpness(model, mean_loss, loader, rho=rho, m=m, steps=80)
    assert res.values == pytest.approx(expected, rel=1e-6)
    assert res.mean == pytest.approx(sum(expected) / 3, rel=1e-6)
    t = torch.tensor(expected, dtype=torch.float64)
    assert res.std == pytest.approx(float(t.std(unbiased=False)), rel=1e-4)
    limited = fs.m_sharpness(model, mean_loss, loader, rho=rho, m=m, steps=80, max_shards=2)
    assert limited.values == pytest.approx(expected[:2], rel=1e-6)


def test_one_step_m_sharpness_is_sams_estimate():
    """steps=1 without a random start: L(w + rho g/||g||) - L(w), SAM's one-step sharpness."""
    A = spd(SPECTRUM, seed=6)
    w = torch.randn(6, dtype=torch.float64)
    model = Quadratic(A, w)
    data = (torch.ones(3, 1, dtype=torch.float64), torch.zeros(3))
    g = A @ w
    e = 0.2 * g / g.norm()
    expected = float(g @ e + 0.5 * e @ A @ e)
    got = fs.m_sharpness(model, mean_loss, data, rho=0.2, m=3, steps=1, random_start=False).mean
    assert got == pytest.approx(expected, rel=1e-6)
    assert got < ball_max(g, A, 0.2)  # the one-step estimate is below the true max


def test_adaptive_m_sharpness_uses_the_weight_scaled_ball():
    """||d / |w||| <= rho is the plain ball for g' = |w| g and A' = |w| A |w| (d = |w| delta)."""
    A = spd(SPECTRUM, seed=7)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, generator=gen, dtype=torch.float64) + 2.0
    model = Quadratic(A, w)
    data = (torch.ones(3, 1, dtype=torch.float64), torch.zeros(3))
    for eta in (0.0, 0.1):
        t = w.abs() + eta
        expected = ball_max(t * (A @ w), t[:, None] * A * t[None, :], 0.1)
        got = fs.m_sharpness(model, mean_loss, data, rho=0.1, m=3, steps=80, adaptive=True, eta=eta).mean
        assert got == pytest.approx(expected, rel=1e-6)
    plain = fs.m_sharpness(model, mean_loss, data, rho=0.1, m=3, steps=80).mean
    assert plain == pytest.approx(ball_max(A @ w, A, 0.1), rel=1e-6)


def test_m_sharpness_bad_input():
    model = Quadratic(spd(SPECTRUM), torch.zeros(6, dtype=torch.float64))
    data = (torch.ones(3, 1, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(ValueError, match="rho"):
        fs.m_sharpness(model, mean_loss, data, rho=-1, m=1)
    with pytest.raises(ValueError, match="m must be"):
        fs.m_sharpness(model, mean_loss, data, rho=0.1, m=0)
    with pytest.raises(ValueError, match="no shard"):
        fs.m_sharpness(model, mean_loss, data, rho=0.1, m=4)
    with pytest.raises(ValueError, match="scalar"):
        fs.m_sharpness(model, lambda out, y: out, data, rho=0.1, m=3)


# ---------------------------------------------------------------------------------------- landscape


def test_landscape_of_a_quadratic_along_a_known_direction():
    A = spd(SPECTRUM, seed=8)
    w = torch.randn(6, dtype=torch.float64)
    d = torch.randn(6, dtype=torch.float64)
    model = Quadratic(A, w)
    data = (torch.ones(5, 1, dtype=torch.float64), torch.zeros(5))
    ls = fs.loss_landscape(model, mean_loss, data, dims=1, steps=11, span=2.0, directions=[[d]], normalize=False)
    a = torch.linspace(-2, 2, 11, dtype=torch.float64)
    expected = torch.stack([0.5 * (w + t * d) @ A @ (w + t * d) for t in a])
    torch.testing.assert_close(ls.losses, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ls.coords[0], a)
    assert ls.center_loss == pytest.approx(float(0.5 * w @ A @ w), rel=1e-12)
    # 2-D: L(w + a d1 + b d2) on the grid
    d2 = torch.randn(6, dtype=torch.float64)
    ls2 = fs.loss_landscape(model, mean_loss, data, dims=2, steps=5, directions=[[d], [d2]], normalize=False)
    b = torch.linspace(-1, 1, 5, dtype=torch.float64)
    grid = torch.stack([torch.stack([0.5 * (w + s * d + t * d2) @ A @ (w + s * d + t * d2) for t in b]) for s in b])
    torch.testing.assert_close(ls2.losses, grid, rtol=1e-12, atol=1e-12)


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def net_data(n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def test_filter_normalized_directions():
    model = small_net()
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    d = fs.filter_normalized_direction(params, gen)
    for p, dp in zip(params, d):
        if p.dim() <= 1:
            assert torch.count_nonzero(dp) == 0  # biases and BatchNorm: left out
        else:
            dims = tuple(range(1, p.dim()))
            torch.testing.assert_close(torch.linalg.vector_norm(dp, dim=dims), torch.linalg.vector_norm(p.detach(), dim=dims),
                                       rtol=1e-5, atol=1e-7)
    kept = fs.filter_normalized_direction(params, torch.Generator().manual_seed(0), ignore_1d=False)
    for p, dp in zip(params, kept):
        if p.dim() <= 1:
            assert torch.equal(dp, p.detach())
    ls = fs.loss_landscape(model, F.cross_entropy, net_data(), steps=7)
    assert ls.losses.shape == (7,) and ls.losses[3] == pytest.approx(ls.center_loss, rel=1e-6)


# ---------------------------------------------------------------------------------------- safety


def snapshot(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def assert_bit_identical(model, snap):
    now = list(model.parameters()) + list(model.buffers())
    assert len(now) == len(snap)
    for a, b in zip(now, snap):
        assert torch.equal(a.detach(), b) and a.detach().view(-1).view(torch.uint8).equal(b.view(-1).view(torch.uint8))


MEASUREMENTS = {
    "m_sharpness": lambda model, lf, data: fs.m_sharpness(model, lf, data, rho=0.1, m=4, steps=3),
    "m_sharpness_adaptive": lambda model, lf, data: fs.m_sharpness(model, lf, data, rho=0.1, m=4, steps=3,
                                                                   adaptive=True),
    "m_sharpness_train": lambda model, lf, data: fs.m_sharpness(model, lf, data, rho=0.1, m=4, steps=2,
                                                                train_mode=True),
    "eigenvalues": lambda model, lf, data: fs.hessian_eigenvalues(model, lf, data, k=2, max_iter=5),
    "eigenvalues_power": lambda model, lf, data: fs.hessian_eigenvalues(model, lf, data, k=2, max_iter=3,
                                                                        method="power"),
    "trace": lambda model, lf, data: fs.hessian_trace(model, lf, data, max_iter=4),
    "landscape_1d": lambda model, lf, data: fs.loss_landscape(model, lf, data, steps=5),
    "landscape_2d": lambda model, lf, data: fs.loss_landscape(model, lf, data, dims=2, steps=3, train_mode=True),
}


@pytest.mark.parametrize("name", list(MEASUREMENTS))
def test_weights_bit_identical_after_every_measurement(name):
    model = small_net()
    x, y = net_data()
    F.cross_entropy(model(x), y).backward()  # the user's .grad must survive too
    model.train()
    grads = [p.grad.clone() for p in model.parameters()]
    snap = snapshot(model)
    MEASUREMENTS[name](model, F.cross_entropy, [(x[:8], y[:8]), (x[8:], y[8:])])
    assert_bit_identical(model, snap)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training


@pytest.mark.parametrize("name", list(MEASUREMENTS))
@pytest.mark.parametrize("fail_at", [1, 3])
def test_weights_bit_identical_when_loss_fn_raises(name, fail_at):
    model = small_net()
    x, y = net_data()
    model.eval()
    snap = snapshot(model)
    calls = []

    def failing(out, target):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return F.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="boom"):
        MEASUREMENTS[name](model, failing, [(x[:8], y[:8]), (x[8:], y[8:])])
    assert_bit_identical(model, snap)
    assert not model.training


def test_quadratic_weights_bit_identical_after_ascent():
    model = Quadratic(spd(SPECTRUM), torch.randn(6, dtype=torch.float64))
    data = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4))
    snap = snapshot(model)
    fs.m_sharpness(model, mean_loss, data, rho=0.5, m=2, steps=7, adaptive=True)
    fs.hessian_eigenvalues(model, mean_loss, data, k=3)
    assert_bit_identical(model, snap)


# ---------------------------------------------------------------------------------------- plots


def test_plot_landscape_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    model = small_net()
    data = net_data()
    one = fs.loss_landscape(model, F.cross_entropy, data, steps=5)
    other = fs.loss_landscape(small_net(1), F.cross_entropy, data, steps=5)
    p1 = fs.plot_landscape({"a": one, "b": other}, tmp_path / "one.png", title="1-D")
    two = fs.loss_landscape(model, F.cross_entropy, data, dims=2, steps=4)
    p2 = fs.plot_landscape(two, tmp_path / "two.png")
    for p in (p1, p2):
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="dimensionality"):
        fs.plot_landscape({"a": one, "b": two}, tmp_path / "mixed.png")


def test_plot_landscape_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    model = small_net()
    ls = fs.loss_landscape(model, F.cross_entropy, net_data(), steps=3)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"fastsam\[plot\]"):
        fs.plot_landscape(ls, tmp_path / "x.png")
