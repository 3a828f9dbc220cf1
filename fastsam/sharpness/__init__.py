"""Measurements of flatness: per-step sharpness, m-sharpness, Hessian spectrum, loss landscapes.

Every function here takes ``model``, ``loss_fn`` and ``data`` in the same way:

* ``loss_fn(model(x), y)`` returns the scalar (mean) loss of a batch;
* ``data`` is one batch ``(x, y)`` or an iterable of such batches (a ``DataLoader``); batches are
  moved to the device of the model's first parameter;
* the measured parameters are the model's parameters with ``requires_grad``.

and every one leaves the model as it found it: parameters bit-identical (also when ``loss_fn`` or
the model raises), ``.grad`` untouched (gradients are taken with ``torch.autograd.grad``), the
train/eval flag restored. The model runs in eval mode (dropout off, BatchNorm on its running
statistics, which therefore do not change) unless ``train_mode=True``, in which case its buffers
are backed up and restored too. Weights are saved and put back with fastsam's fused restore op
(:func:`fastsam.ops.restore_`, one in-place copy per device/dtype bucket) and norms are taken with
:func:`fastsam.ops.grad_norm`, so a measurement costs what the optimizer's own steps cost.

* :class:`SharpnessLog`: collects ``optimizer.sharpness`` (``L(w + e) - L(w)``, which every SAM
  step fills for free when given both losses, see :attr:`fastsam.SAM.sharpness`) with the loss.
* :func:`m_sharpness`: Foret et al.'s m-sharpness (ICLR 2021, section 4) as measured by
  Andriushchenko et al. ("A Modern Look at the Relationship between Sharpness and Generalization",
  ICML 2023): the average over disjoint ``m``-sample shards ``S`` of
  ``max_{||d|| <= rho} L_S(w + d) - L_S(w)``, the max found by projected normalised gradient ascent;
  ``adaptive=True`` is their adaptive (scale-invariant) ball ``||d / (|w| + eta)|| <= rho``.
* :func:`hessian_eigenvalues`, :func:`hessian_trace`: top-k eigenvalues by Lanczos (or PyHessian's
  power iteration with deflation) and the trace by Hutchinson's estimator, on Hessian-vector
  products over a loader (Yao et al., "PyHessian: Neural Networks Through the Lens of the Hessian", 2020).
* :func:`loss_landscape`, :func:`plot_landscape`: 1-D and 2-D slices along filter-normalised random
  directions (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018); the plot
  needs matplotlib (``pip install 'fastsam[plot]'``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from fastsam import ops

__all__ = [
    "SharpnessLog", "MSharpness", "Landscape",
    "m_sharpness", "hessian_eigenvalues", "hessian_trace", "loss_landscape", "plot_landscape",
]


# ------------------------------------------------------------------------------------------------
# per-step sharpness from the optimizer
# ------------------------------------------------------------------------------------------------


class SharpnessLog:
    """Collects the loss and ``optimizer.sharpness`` of each step without reading them on the host.

    ``record(optimizer, loss)`` after each step appends device tensors (no sync); ``rows()``,
    ``summary()`` and ``format_last()`` read them (one sync each), e.g. once per epoch::

        log = fastsam.sharpness.SharpnessLog()
        for x, y in loader:
            loss = loss_fn(model(x), y); loss.backward()
            opt.first_step(zero_grad=True, loss=loss)
            loss_p = loss_fn(model(x), y); loss_p.backward()
            opt.second_step(zero_grad=True, loss=loss_p)
            log.record(opt, loss)
        print(log.format_last(), log.summary())

    ``maxlen`` keeps only the last entries (None: all). ``clear()`` empties the log.
    """

    def __init__(self, maxlen: int | None = None):
        if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1):
            raise ValueError(f"maxlen must be an int >= 1 or None, got {maxlen!r}")
        self.maxlen = maxlen
        self._entries: list = []  # (step, loss tensor or None, sharpness tensor or None)
        self._step = 0

    def record(self, optimizer, loss=None) -> None:
        """Append this step's loss (a scalar tensor, detached here) and the optimizer's sharpness."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        sharpness = getattr(optimizer, "sharpness", None)
        self._entries.append((self._step, loss, sharpness))
        self._step += 1
        if self.maxlen is not None and len(self._entries) > self.maxlen:
            del self._entries[0]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def rows(self) -> list[dict]:
        """``[{"step", "loss", "sharpness"}, ...]`` as Python floats (None where unknown)."""
        def value(t):
            if t is None:
                return None
            return float(t) if not isinstance(t, torch.Tensor) else t
        tensors = [t for _, loss, s in self._entries for t in (loss, s) if isinstance(t, torch.Tensor)]
        # One transfer per device for all of them rather than one sync per value.
        by_device: dict = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        values = [0.0] * len(tensors)
        for idx in by_device.values():
            for i, v in zip(idx, torch.stack([tensors[i].reshape(()).float() for i in idx]).cpu().tolist()):
                values[i] = v
        host = iter(values)
        out = []
        for step, loss, s in self._entries:
            row = {"step": step}
            for name, t in (("loss", loss), ("sharpness", s)):
                row[name] = next(host) if isinstance(t, torch.Tensor) else value(t)
            out.append(row)
        return out

    def summary(self) -> dict:
        """Number of steps and the mean loss and sharpness over the entries that have them."""
        rows = self.rows()
        out = {"steps": len(rows)}
        for name in ("loss", "sharpness"):
            vals = [r[name] for r in rows if r[name] is not None]
            out[name] = sum(vals) / len(vals) if vals else None
        return out

    def format_last(self) -> str:
        """The last entry as ``"step N loss L sharpness S"``."""
        if not self._entries:
            return "no steps recorded"
        step, loss, s = self._entries[-1]
        parts = [f"step {step}"]
        for name, t in (("loss", loss), ("sharpness", s)):
            parts.append(f"{name} {float(t):.4g}" if t is not None else f"{name} -")
        return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# shared plumbing
# ------------------------------------------------------------------------------------------------


def _params(model) -> list[torch.Tensor]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True to measure")
    return params


def _is_batch(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def _batches(data, device, max_batches=None):
    """Yield (x, y) batches on ``device`` from one batch or an iterable of batches."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
    source = [data] if _is_batch(data) else data
    count = 0
    for batch in source:
        if max_batches is not None and count >= max_batches:
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(f"data must yield (inputs, targets) batches, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        yield (x.to(device) if isinstance(x, torch.Tensor) else x), (y.to(device) if isinstance(y, torch.Tensor) else y)
        count += 1
    if count == 0:
        raise ValueError("data yielded no batches")


def _batch_size(x, y) -> int:
    t = y if isinstance(y, torch.Tensor) and y.dim() > 0 else x
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() > 0 else 1


def _scalar_loss(loss_fn, model, x, y) -> torch.Tensor:
    loss = loss_fn(model(x), y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn(model(x), y) must return the scalar (mean) loss of the batch, got {got}")
    return loss.reshape(())


def _copy_list(dst: list, src: list) -> None:
    """``dst[i].copy_(src[i])`` with the fused restore op (a constant number of launches per bucket)."""
    ops.restore_(dst, src)


def _norm(tensors: list) -> torch.Tensor:
    """Global L2 norm of a list (fp32 on the device, no sync), with fastsam's norm op."""
    return ops.grad_norm(tensors)


@contextlib.contextmanager
def _measuring(model, params, train_mode: bool = False):
    """Back the parameters (and, in train mode, the buffers) up; put them back bit for bit on exit."""
    backups = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
    buffers = [b for b in model.buffers()] if train_mode else []
    buffer_backups = [b.detach().clone() for b in buffers]
    was_training = model.training
    with torch.no_grad():
        _copy_list(backups, [p.detach() for p in params])
    try:
        model.train(train_mode)
        yield backups
    finally:
        with torch.no_grad():
            _copy_list([p.detach() for p in params], backups)
            for b, saved in zip(buffers, buffer_backups):
                b.copy_(saved)
        model.train(was_training)


def _progress(total, desc, enabled):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _tick(bar, n=1):
    if bar is not None:
        bar.update(n)


def _check_positive_int(name, value, allow_none=False):
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def _check_nonneg(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _grads(loss, params, create_graph=False):
    grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# ------------------------------------------------------------------------------------------------
# m-sharpness
# ------------------------------------------------------------------------------------------------


@dataclass
class MSharpness:
    """Result of :func:`m_sharpness`: mean and (population) std over the shards, and each shard's value.

    Unpacks as ``mean, std = m_sharpness(...)``.
    """

    mean: float
    std: float
    values: list = field(default_factory=list)

    def __iter__(self):
        return iter((self.mean, self.std))


def _set_weights(params, w0, scale, delta) -> None:
    """``w = w0 + scale * delta`` in place (scale None: the plain ball)."""
    _copy_list(params, w0)
    if scale is None:
        torch._foreach_add_(params, delta)
    else:
        torch._foreach_addcmul_(params, scale, delta)


def m_sharpness(model, loss_fn, data, rho: float, m: int, steps: int = 10, adaptive: bool = False, *,
                eta: float = 0.0, step_size: float | None = None, max_shards: int | None = None,
                random_start: bool = True, seed: int = 0, train_mode: bool = False,
                progress: bool = False) -> MSharpness:
    r"""m-sharpness: mean over disjoint ``m``-sample shards ``S`` of ``max_{d in B} L_S(w + d) - L_S(w)``.

    ``B`` is the ball ``||d|| <= rho`` or, with ``adaptive=True``, Andriushchenko et al.'s adaptive
    ball ``||d / T|| <= rho`` with ``T = |w| + eta`` (elementwise, at the measured ``w``). Writing
    ``d = T * delta`` (``T = 1`` for the plain ball), each of ``steps`` ascent steps does

        delta <- delta + step_size * (T g) / ||T g||,   g = grad L_S(w + T delta)
        delta <- delta * rho / max(||delta||, rho)         (projection back onto the ball)

    starting from a tiny random point (``random_start``: norm ``1e-3 rho``, seeded by ``seed``, so a
    zero gradient at ``w``, e.g. a quadratic's minimum, still finds the sharpest direction) or from
    ``delta = 0``. The value is the largest ``L_S`` seen at the visited points minus ``L_S(w)``: a
    lower bound of the true max that is exact at convergence (for a convex quadratic the ascent is a
    power iteration and converges to ``0.5 rho^2 lambda_max`` at its minimum). ``step_size``
    defaults to ``rho``, so ``steps=1`` is SAM's own one-step estimate.

    Shards: each batch of ``data`` is cut into consecutive runs of ``m`` samples; a remainder shorter
    than ``m`` is dropped. ``max_shards`` limits the number of shards measured. Weights are restored
    bit for bit after every shard and also when anything raises.

    Returns :class:`MSharpness` (``mean``, ``std``, per-shard ``values``).
    """
    _check_nonneg("rho", rho)
    _check_nonneg("eta", eta)
    _check_positive_int("m", m)
    _check_positive_int("steps", steps)
    _check_positive_int("max_shards", max_shards, allow_none=True)
    if step_size is None:
        step_size = float(rho)
    _check_nonneg("step_size", step_size)
    params = _params(model)
    device = params[0].device
    gen = torch.Generator().manual_seed(int(seed))
    values = []
    with _measuring(model, params, train_mode) as w0, _progress(max_shards, "m-sharpness", progress) as bar:
        with torch.no_grad():
            scale = None
            if adaptive:
                scale = torch._foreach_abs(w0)
                if eta:
                    torch._foreach_add_(scale, float(eta))
        for x, y in _batches(data, device):
            n = _batch_size(x, y)
            for start in range(0, n - m + 1, m):
                if max_shards is not None and len(values) >= max_shards:
                    break
                xs, ys = x[start:start + m], y[start:start + m]
                values.append(_shard_sharpness(model, loss_fn, params, w0, scale, xs, ys, rho, steps,
                                               step_size, random_start, gen))
                _tick(bar)
            if max_shards is not None and len(values) >= max_shards:
                break
    if not values:
        raise ValueError(f"no shard of m={m} samples: every batch of data is smaller than m")
    vals = torch.stack([v.detach().cpu().double() for v in values])
    std = float(vals.std(unbiased=False)) if len(values) > 1 else 0.0
    return MSharpness(float(vals.mean()), std, vals.tolist())


def _shard_sharpness(model, loss_fn, params, w0, scale, x, y, rho, steps, step_size, random_start, gen):
    with torch.no_grad():
        _copy_list(params, w0)
        base = _scalar_loss(loss_fn, model, x, y).detach()
        delta = [torch.zeros_like(p) for p in params]
        if random_start and rho > 0:
            noise = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) for p in params]
            torch._foreach_mul_(noise, (1e-3 * rho) / (_norm(noise) + 1e-30))
            delta = noise
        _set_weights(params, w0, scale, delta)
    best = None
    for _ in range(steps):
        with torch.enable_grad():
            loss = _scalar_loss(loss_fn, model, x, y)
            grads = _grads(loss, params)
        with torch.no_grad():
            loss = loss.detach()
            best = loss if best is None else torch.maximum(best, loss)
            if scale is not None:
                torch._foreach_mul_(grads, scale)  # the gradient in delta's coordinates
            gnorm = _norm(grads)
            # delta += step_size * g / ||g||; a zero gradient leaves delta where it is.
            torch._foreach_mul_(grads, step_size / (gnorm + 1e-30))
            torch._foreach_add_(delta, grads)
            dnorm = _norm(delta)
            torch._foreach_mul_(delta, rho / torch.clamp(dnorm, min=max(float(rho), 1e-30)))
            _set_weights(params, w0, scale, delta)
    with torch.no_grad():
        loss = _scalar_loss(loss_fn, model, x, y).detach()
        best = torch.maximum(best, loss)
        _copy_list(params, w0)
    return best - base


# ------------------------------------------------------------------------------------------------
# Hessian: eigenvalues and trace
# ------------------------------------------------------------------------------------------------


def _hvp(model, loss_fn, params, batches, v) -> list[torch.Tensor]:
    """``H v`` of the data's loss (batches weighted by size: the Hessian of the mean over samples)."""
    out = [torch.zeros_like(p) for p in params]
    total = 0
    for x, y in batches:
        n = _batch_size(x, y)
        with torch.enable_grad():
            loss = _scalar_loss(loss_fn, model, x, y)
            grads = _grads(loss, params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, v) if g.requires_grad)
            if isinstance(dot, torch.Tensor) and dot.requires_grad:
                hv = _grads(dot, params)
            else:  # the loss is linear in the parameters: H = 0
                hv = [torch.zeros_like(p) for p in params]
        torch._foreach_add_(out, [h.detach() * n for h in hv])
        total += n
    torch._foreach_div_(out, float(total))
    return out


def _dot(a, b) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _normalize_(v) -> None:
    norm = torch.sqrt(_dot(v, v))
    torch._foreach_div_(v, (norm + 1e-300).to(v[0].dtype))


def _orthogonalize_(v, basis) -> None:
    for u in basis:
        c = _dot(v, u).to(v[0].dtype)
        torch._foreach_add_(v, torch._foreach_mul(u, -c))


def _rademacher(params, gen):
    return [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]


def _cached(data, device, max_batches):
    """Batches as a list (so each Hessian-vector product sees the same data)."""
    return list(_batches(data, device, max_batches))


def hessian_eigenvalues(model, loss_fn, data, k: int = 1, *, method: str = "lanczos", max_iter: int = 100,
                        tol: float = 1e-6, seed: int = 0, max_batches: int | None = None,
                        return_vectors: bool = False, train_mode: bool = False, progress: bool = False):
    r"""Top-``k`` Hessian eigenvalues of the data's mean loss, from Hessian-vector products.

    ``H v`` is a double-backward product summed over every batch of ``data`` (weighted by batch size:
    the Hessian of the mean loss over the samples).

    * ``method="lanczos"`` (default): Lanczos from a seeded random vector, with full
      re-orthogonalisation, stopped when the ``k`` largest Ritz values change by less than
      ``tol * |value|`` in one iteration, after ``max_iter`` products, or when the Krylov space is
      invariant (then they are exact). Gives the ``k`` *largest* eigenvalues; keeps one vector per
      iteration (``max_iter`` parameter-sized vectors at most).
    * ``method="power"``: power iteration with deflation, as PyHessian (Yao et al. 2020) does: for
      ``i = 1..k``, ``v <- P H v / ||P H v||`` (``P`` projects out the eigenvectors found so far)
      until the Rayleigh quotient changes by less than ``tol * |lambda|`` or ``max_iter`` products
      per eigenvalue. Finds the eigenvalues of largest *magnitude* (the largest ones at a minimum);
      keeps ``k`` vectors.

    ``max_batches`` limits the batches used (held for the whole computation, so that every product
    sees the same data). Parameters, buffers and ``.grad`` are left as they were.

    Returns a list of ``k`` floats, largest first, or ``(eigenvalues, eigenvectors)`` with
    ``return_vectors=True`` (each eigenvector a unit-norm list of tensors shaped like the parameters).
    """
    _check_positive_int("k", k)
    _check_positive_int("max_iter", max_iter)
    _check_nonneg("tol", tol)
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    params = _params(model)
    dim = sum(p.numel() for p in params)
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of parameters ({dim})")
    if method == "lanczos" and max_iter < k:
        raise ValueError(f"Lanczos needs max_iter >= k (got max_iter={max_iter}, k={k})")
    batches = _cached(data, params[0].device, max_batches)
    gen = torch.Generator().manual_seed(int(seed))
    total = max_iter if method == "lanczos" else k * max_iter
    with _measuring(model, params, train_mode), _progress(total, "hessian eigenvalues", progress) as bar:
        def hvp(v):
            _tick(bar)
            return _hvp(model, loss_fn, params, batches, v)

        def random_vector():
            return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]

        if method == "lanczos":
            eigenvalues, eigenvectors = _lanczos(hvp, random_vector, k, min(max_iter, dim), tol)
        else:
            eigenvalues, eigenvectors = _power(hvp, random_vector, k, max_iter, tol)
        if bar is not None:
            bar.update(max(0, total - bar.n))
    if return_vectors:
        return eigenvalues, eigenvectors
    return eigenvalues


def _lanczos(hvp, random_vector, k, max_iter, tol):
    basis = []  # orthonormal Lanczos vectors q_0, q_1, ...
    alphas, betas = [], []  # T's diagonal and off-diagonal
    q = random_vector()
    _normalize_(q)
    previous = None
    for j in range(max_iter):
        basis.append(q)
        w = hvp(q)
        alphas.append(float(_dot(w, q)))
        _orthogonalize_(w, basis)  # full re-orthogonalisation (twice: classical Gram-Schmidt drifts)
        _orthogonalize_(w, basis)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        ritz = torch.linalg.eigvalsh(t).flip(0)
        top = ritz[:k].tolist()
        beta = math.sqrt(max(float(_dot(w, w)), 0.0))
        scale = max(abs(a) for a in alphas) or 1.0
        invariant = beta <= 1e-10 * scale
        converged = (previous is not None and len(top) == k and len(previous) == k
                     and all(abs(a - b) <= tol * max(abs(a), 1e-30) for a, b in zip(top, previous)))
        if (converged or invariant) and len(top) >= k:
            break
        previous = top
        if j == max_iter - 1:
            break
        if invariant:  # an invariant subspace smaller than k: continue from a fresh orthogonal direction
            w = random_vector()
            _orthogonalize_(w, basis)
            _orthogonalize_(w, basis)
            beta_norm = math.sqrt(float(_dot(w, w)))
            betas.append(0.0)
            torch._foreach_div_(w, beta_norm)
            q = w
            continue
        betas.append(beta)
        torch._foreach_div_(w, beta)
        q = w
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(t)
    order = torch.argsort(vals, descending=True)[:k]
    eigenvalues = [float(vals[i]) for i in order]
    eigenvectors = []
    for i in order:
        v = [torch.zeros_like(b) for b in basis[0]]
        for c, qj in zip(vecs[:, i].tolist(), basis):
            torch._foreach_add_(v, qj, alpha=c)
        eigenvectors.append(v)
    return eigenvalues, eigenvectors


def _power(hvp, random_vector, k, max_iter, tol):
    eigenvalues, eigenvectors = [], []
    for _ in range(k):
        v = random_vector()
        _orthogonalize_(v, eigenvectors)
        _normalize_(v)
        lam = None
        for _ in range(max_iter):
            hv = hvp(v)
            _orthogonalize_(hv, eigenvectors)
            new = float(_dot(v, hv))
            hv_norm = math.sqrt(max(float(_dot(hv, hv)), 0.0))
            if hv_norm == 0.0:  # H v = 0 on the remaining space: the eigenvalue is 0
                lam = 0.0
                break
            torch._foreach_div_(hv, hv_norm)
            v = hv
            converged = lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30)
            lam = new
            if converged:
                break
        # The Rayleigh quotient at the returned vector (one more product).
        hv = hvp(v)
        _orthogonalize_(hv, eigenvectors)
        eigenvalues.append(float(_dot(v, hv)))
        eigenvectors.append([t.detach().clone() for t in v])
    order = sorted(range(k), key=lambda i: -eigenvalues[i])
    return [eigenvalues[i] for i in order], [eigenvectors[i] for i in order]


def hessian_trace(model, loss_fn, data, *, max_iter: int = 100, tol: float = 1e-3, seed: int = 0,
                  max_batches: int | None = None, train_mode: bool = False, progress: bool = False) -> float:
    r"""Hessian trace of the data's mean loss by Hutchinson's estimator, ``tr H = E[v^T H v]``.

    ``v`` has independent Rademacher (+-1) entries drawn from a generator seeded with ``seed``, so the
    estimate is reproducible. Samples are added until the standard error of the running mean falls
    below ``tol * |mean|`` (after at least two samples) or ``max_iter`` samples were drawn. For a
    diagonal Hessian every sample is exact; in general the variance of one sample is
    ``2 sum_{i != j} H_ij^2``. Parameters and ``.grad`` are left as they were.
    """
    _check_positive_int("max_iter", max_iter)
    _check_nonneg("tol", tol)
    params = _params(model)
    batches = _cached(data, params[0].device, max_batches)
    gen = torch.Generator().manual_seed(int(seed))
    samples = []
    with _measuring(model, params, train_mode), _progress(max_iter, "hessian trace", progress) as bar:
        for _ in range(max_iter):
            v = _rademacher(params, gen)
            samples.append(float(_dot(v, _hvp(model, loss_fn, params, batches, v))))
            _tick(bar)
            if len(samples) >= 2:
                mean = sum(samples) / len(samples)
                var = sum((s - mean) ** 2 for s in samples) / (len(samples) - 1)
                if math.sqrt(var / len(samples)) <= tol * abs(mean):
                    break
        if bar is not None:
            bar.update(max_iter - len(samples))
    return sum(samples) / len(samples)


# ------------------------------------------------------------------------------------------------
# loss landscape
# ------------------------------------------------------------------------------------------------


@dataclass
class Landscape:
    """A loss-landscape slice: ``losses[i]`` (1-D) or ``losses[i, j]`` (2-D) at ``w + a_i d_1 (+ b_j d_2)``.

    ``coords`` holds ``a`` (and ``b``), ``directions`` the direction(s) used (lists of tensors shaped
    like the parameters), ``center_loss`` the loss at ``w``.
    """

    coords: list
    losses: torch.Tensor
    directions: list
    center_loss: float

    @property
    def dims(self) -> int:
        return len(self.coords)


def filter_normalized_direction(params, gen, ignore_1d: bool = True) -> list[torch.Tensor]:
    """A random direction with each filter scaled to its weights' norm (Li et al. 2018, section 4).

    For a parameter of rank >= 2 (a linear layer's rows, a convolution's output filters) each slice
    ``d[i]`` of a Gaussian direction is rescaled to ``||w[i]||``. Rank-0/1 parameters (biases,
    normalisation weights) get a zero direction with ``ignore_1d`` (as the paper does), else their
    own values (each element its own filter, as the authors' code does).
    """
    out = []
    for p in params:
        w = p.detach()
        if w.dim() <= 1:
            out.append(torch.zeros_like(w) if ignore_1d else w.clone())
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w)
        out.append(_rescale_filters(d, w))
    return out


def _mean_loss(model, loss_fn, batches) -> torch.Tensor:
    total, count = None, 0
    for x, y in batches:
        n = _batch_size(x, y)
        loss = _scalar_loss(loss_fn, model, x, y).detach().double() * n
        total = loss if total is None else total + loss
        count += n
    return total / count


def loss_landscape(model, loss_fn, data, dims: int = 1, *, steps: int = 21, span: float = 1.0,
                   directions=None, normalize: bool = True, ignore_1d: bool = True, seed: int = 0,
                   max_batches: int | None = None, train_mode: bool = False, progress: bool = False) -> Landscape:
    r"""The loss on a 1-D line or 2-D plane through ``w``: ``L(w + a d_1)`` or ``L(w + a d_1 + b d_2)``.

    ``a`` and ``b`` run over ``steps`` evenly spaced values in ``[-span, span]``. The directions are
    filter-normalised Gaussian ones (:func:`filter_normalized_direction`, seeded by ``seed``) unless
    ``directions`` gives them (a list of ``dims`` directions, each a list of tensors shaped like the
    measured parameters); given directions are filter-normalised too unless ``normalize=False``.
    The loss at each point averages ``loss_fn`` over the batches of ``data`` (weighted by batch
    size). Weights are restored bit for bit afterwards, also on error.

    Returns a :class:`Landscape`; :func:`plot_landscape` draws it.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    _check_positive_int("steps", steps)
    _check_nonneg("span", span)
    params = _params(model)
    if directions is None:
        gen = torch.Generator().manual_seed(int(seed))
        dirs = [filter_normalized_direction(params, gen, ignore_1d) for _ in range(dims)]
    else:
        if len(directions) != dims:
            raise ValueError(f"directions must hold {dims} direction(s), got {len(directions)}")
        dirs = []
        for d in directions:
            d = list(d)
            if len(d) != len(params) or any(tuple(a.shape) != tuple(p.shape) for a, p in zip(d, params)):
                raise ValueError("each direction must be a list of tensors shaped like the model's trainable "
                                 "parameters, in model.parameters() order")
            d = [a.detach().to(p) for a, p in zip(d, params)]
            if normalize:
                d = _filter_normalize(d, params, ignore_1d)
            dirs.append(d)
    batches = _cached(data, params[0].device, max_batches)
    coords = torch.linspace(-span, span, steps, dtype=torch.float64)
    shape = (steps,) * dims
    losses = torch.empty(shape, dtype=torch.float64)
    with _measuring(model, params, train_mode) as w0, _progress(steps ** dims, "loss landscape", progress) as bar:
        with torch.no_grad():
            center = float(_mean_loss(model, loss_fn, batches))
            for index in range(steps ** dims):
                ij = (index,) if dims == 1 else divmod(index, steps)
                _copy_list(params, w0)
                for axis, i in enumerate(ij):
                    torch._foreach_add_(params, dirs[axis], alpha=float(coords[i]))
                losses[ij] = _mean_loss(model, loss_fn, batches)
                _tick(bar)
    return Landscape([coords.clone() for _ in range(dims)], losses, dirs, center)


def _filter_normalize(d, params, ignore_1d):
    out = []
    for a, p in zip(d, params):
        w = p.detach()
        if w.dim() <= 1:
            out.append(torch.zeros_like(w) if ignore_1d else a)
            continue
        out.append(_rescale_filters(a, w))
    return out


def _rescale_filters(d, w):
    """``d[i] * ||w[i]|| / ||d[i]||`` for every filter ``i`` (slice along dim 0), math in >= fp32."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    dims = tuple(range(1, w.dim()))
    w_norm = torch.linalg.vector_norm(w.to(dtype), dim=dims, keepdim=True)
    d_norm = torch.linalg.vector_norm(d.to(dtype), dim=dims, keepdim=True)
    return (d.to(dtype) * (w_norm / (d_norm + 1e-10))).to(w.dtype)


def plot_landscape(landscapes, path, *, title: str | None = None, ylabel: str = "loss", log_scale: bool = False):
    """Write a PNG of one :class:`Landscape` or of several (a ``{name: Landscape}`` dict) to ``path``.

    1-D: one line per landscape on shared axes. 2-D: a contour plot per landscape, side by side, with
    the same contour levels in every panel. ``log_scale``: a logarithmic loss axis (1-D) or
    log-spaced contour levels (2-D).
    Needs matplotlib: ``pip install 'fastsam[plot]'``. Returns ``path``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_landscape needs matplotlib: pip install 'fastsam[plot]'") from None
    if isinstance(landscapes, Landscape):
        landscapes = {"": landscapes}
    if not landscapes:
        raise ValueError("no landscape to plot")
    dims = {ls.dims for ls in landscapes.values()}
    if len(dims) != 1:
        raise ValueError("plot_landscape draws landscapes of one dimensionality at a time")
    if dims == {1}:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, ls in landscapes.items():
            ax.plot(ls.coords[0].numpy(), ls.losses.numpy(), marker="o", markersize=3, label=name or None)
        ax.set_xlabel("step along a filter-normalised direction")
        ax.set_ylabel(ylabel)
        if log_scale:
            ax.set_yscale("log")
        if any(landscapes):
            ax.legend()
        ax.grid(alpha=0.3)
    else:
        n = len(landscapes)
        fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.4), squeeze=False)
        # One set of contour levels for every panel, so that the panels compare; log-spaced on request.
        lo = min(float(ls.losses.min()) for ls in landscapes.values())
        hi = max(float(ls.losses.max()) for ls in landscapes.values())
        if log_scale and lo > 0:
            levels = torch.logspace(math.log10(lo), math.log10(hi), 16, dtype=torch.float64).numpy()
        else:
            levels = torch.linspace(lo, hi, 16, dtype=torch.float64).numpy()
        for ax, (name, ls) in zip(axes[0], landscapes.items()):
            a, b = ls.coords
            cs = ax.contour(a.numpy(), b.numpy(), ls.losses.T.numpy(), levels=levels)
            ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
            ax.plot([0], [0], marker="+", color="k")
            ax.set_title(name)
            ax.set_xlabel("direction 1")
            ax.set_ylabel("direction 2")
            ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
