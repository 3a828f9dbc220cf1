"""bSAM: Bayesian SAM (Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023).

bSAM is SAM derived as a relaxation of Bayesian inference: an Adam-like method over a Gaussian
posterior ``N(w, 1 / (num_data * s))`` whose precision ``s`` sets both the noise and the size of
SAM's step. This is the authors' algorithm (team-approx-bayes/bayesian-sam, ``optim.py``,
``build_bsam_optimizer``, with ``msharpness = 1``); per step, element-wise:

    1. noise:     w_n = w + n / sqrt(num_data * s),  n ~ N(0, 1)             (first_step)
    2.            g   = grad L(w_n)                                           (the caller's backward)
    3. ascent:    w_p = w + rho * g / s   (from the clean w);  h = sqrt(s) |g|  (second_step)
    4.            g_p = grad L(w_p)                                           (the caller's backward)
    5. update:    m = beta1 m + (1 - beta1) (g_p + delta w)                    (third_step, from the clean w)
                  w = w - lr * m / s
                  s = beta2 s + (1 - beta2) (h + damping + delta)

with ``delta`` the weight decay, ``s`` starting at ``s_init`` and ``m`` at 0. ``adaptive=True``
scales the ascent by ``w^2`` (pytorch-optimizer's option; not in the paper).

pytorch-optimizer 4.1's ``BSAM`` departs from this: it never takes the noise and the ascent back
off the weights before the update, draws the noise with standard deviation ``1 / (num_data s)``
instead of ``1 / sqrt(num_data s)``, forms its momentum from ``weight_decay * g_p`` and its
precision from ``(sqrt(s)|g_p| + damping + delta)^2``; on a small MLP its loss rises where the
authors' algorithm falls (tests/test_bsam.py shows both).

The noise comes from a ``torch.Generator`` per device, seeded by ``seed`` (drawn from torch's
global generator when None); its state is in ``state_dict()["fastsam"]["generators"]``, so a
resumed run continues bit for bit. Ops: :func:`fastsam.ops.bsam_noise_`, :func:`fastsam.ops.bsam_ascent_`,
:func:`fastsam.ops.bsam_step_` (torch, Triton and CUDA backends; on Triton and CUDA one fused launch
each per bucket, after the noise's one ``torch.randn``, so every backend draws the same sample), a
constant number of kernels per (device, dtype) bucket. No host synchronisation.
"""

from __future__ import annotations

import math

import torch

from fastsam import ops

from ._variant_utils import buckets_of

_STAGES = ("idle", "noisy", "perturbed")


def _finite_nonneg(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


class BSAM(torch.optim.Optimizer):
    r"""Bayesian SAM, a standalone optimizer with pytorch-optimizer's arguments.

    Args:
        params: parameters, named parameters or param groups.
        num_data: training-set size ``N`` (the posterior's noise is ``1 / (N s)``).
        lr, betas, weight_decay, rho, damping: as in the formulas of the module docstring (the
            defaults are pytorch-optimizer's and the authors' CIFAR settings' order of magnitude).
        adaptive: scale the ascent step by ``w^2``.
        s_init: initial precision (the authors' ``s_init``; 1 as in pytorch-optimizer).
        seed: seed of the noise generators (None: drawn from torch's global generator).
        backend: ``"auto"``, ``"torch"``, ...: the op backend of bSAM's three ops.

    Use ``loss = opt.step(closure)``, where ``closure()`` computes the loss and its gradients
    (``.grad`` is cleared before each of its two calls), or the three-call form::

        opt.first_step(zero_grad=True); loss_fn(model(x), y).backward()   # noisy weights
        opt.second_step(zero_grad=True); loss_fn(model(x), y).backward()  # perturbed weights
        opt.third_step(zero_grad=True)                                    # clean weights, updated

    An exception between the calls leaves the weights perturbed until ``restore()`` (``step``
    restores them itself). ``state[p]`` holds ``momentum`` and ``precision``.
    """

    def __init__(self, params, num_data: int, lr: float = 0.5, betas=(0.9, 0.999), weight_decay: float = 1e-4,
                 rho: float = 0.05, adaptive: bool = False, damping: float = 0.1, *, s_init: float = 1.0,
                 seed: int | None = None, backend: str | None = "auto"):
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be an int >= 1, got {num_data!r}")
        if not isinstance(lr, torch.Tensor):
            _finite_nonneg("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        _finite_nonneg("weight_decay", weight_decay)
        _finite_nonneg("rho", rho)
        _finite_nonneg("damping", damping)
        _finite_nonneg("s_init", s_init, positive=True)
        self.backend = ops.check_backend(backend)
        self.num_data = int(num_data)
        self.s_init = float(s_init)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=float(weight_decay), rho=float(rho),
                        adaptive=bool(adaptive), damping=float(damping))
        params = list(params) if not isinstance(params, torch.Tensor) else [params]
        self._refuse_duplicates(self._as_groups(params))  # before torch's loader (which only warns, or says less)
        super().__init__(params, defaults)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # at construction, not in a step
        self.seed = int(seed)
        self._generators: dict = {}
        for p in self._all_params():  # created now, so that state_dict() has them from the start
            self._generator(p.device)
        self._stage = "idle"
        self._backups: dict = {}
        self._scales: dict = {}
        self._ascended: set = set()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _as_groups(params: list) -> list:
        """``params`` as a list of ``{"params": [tensors]}`` (names dropped), for the duplicate check."""
        if params and all(isinstance(g, dict) for g in params):
            return [dict(params=[p[1] if isinstance(p, tuple) else p for p in
                                 ([g["params"]] if isinstance(g["params"], torch.Tensor) else g["params"])])
                    for g in params]
        return [dict(params=[p[1] if isinstance(p, tuple) else p for p in params])]

    @staticmethod
    def _refuse_duplicates(groups) -> None:
        seen = set()
        for group in groups:
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"BSAM: a parameter of shape {tuple(p.shape)} is listed more than once (it "
                                     "would get two noise draws and two updates per step)")
                seen.add(id(p))

    def add_param_group(self, param_group: dict) -> None:
        if "_generators" in self.__dict__:  # not during torch's __init__ (checked there as a whole)
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            self._refuse_duplicates(self.param_groups + [dict(param_group, params=params)])
            param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        if "_generators" in self.__dict__:
            for p in param_group["params"]:
                self._generator(p.device)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
            # Each device gets its own stream: the seed mixed with the device name.
            gen.manual_seed((self.seed + sum(map(ord, key)) * 1000003) % (2 ** 63))
        return gen

    def _params_with_grad(self, group) -> list:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"BSAM does not support sparse gradients (parameter of shape {tuple(p.shape)})")
            out.append(p)
        return out

    def _all_params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    def _state_for(self, p):
        st = self.state[p]
        if "precision" not in st:
            st["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["precision"] = torch.full_like(p, self.s_init, memory_format=torch.preserve_format)
        return st

    def _buffer(self, cache: dict, p):
        b = cache.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = cache[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return b

    def _clear_grads(self) -> None:
        for p in self._all_params():
            p.grad = None

    # ------------------------------------------------------------------ the three steps

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Back the weights up and move them to a posterior sample ``w + n / sqrt(N s)``."""
        if self._stage != "idle":
            raise RuntimeError("BSAM.first_step() called twice without third_step() (or restore())")
        params = self._all_params()
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"BSAM does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        for (device, dtype), ps in buckets_of(params).items():
            ops.resolve("bsam_noise", self.backend, device, dtype)  # an unavailable backend raises first
        for (device, dtype), ps in buckets_of(params).items():
            _, noise = ops.resolve("bsam_noise", self.backend, device, dtype)
            noise(ps, [self._buffer(self._backups, p) for p in ps], [self._state_for(p)["precision"] for p in ps],
                  self.num_data, self._generator(device))
        self._stage = "noisy"
        if zero_grad:
            self._clear_grads()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """From the clean weights, ascend to ``w + rho g / s`` with ``g`` the noisy-point gradient."""
        if self._stage != "noisy":
            raise RuntimeError("BSAM.second_step() needs first_step() (and a backward at the noisy weights) first")
        plan = []
        for group in self.param_groups:
            ps = self._params_with_grad(group)
            for (device, dtype), bucket in buckets_of(ps).items():
                plan.append((group, bucket, ops.resolve("bsam_ascent", self.backend, device, dtype)[1]))
        missing = [p for p in self._all_params() if p.grad is None]
        if missing:  # parameters without a gradient: back to their clean value, not perturbed
            self._restore_list(missing)
        for group, bucket, ascent in plan:
            ascent(bucket, [self._backups[p] for p in bucket], [p.grad for p in bucket],
                   [self.state[p]["precision"] for p in bucket], [self._buffer(self._scales, p) for p in bucket],
                   group["rho"], group["adaptive"])
        self._stage = "perturbed"
        self._ascended = {p for _, bucket, _ in plan for p in bucket}
        if zero_grad:
            self._clear_grads()

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False) -> None:
        """Restore the clean weights and update momentum, weights and precision."""
        if self._stage != "perturbed":
            raise RuntimeError("BSAM.third_step() needs second_step() (and a backward at the perturbed weights) first")
        ascended = self._ascended
        plan = []
        for group in self.param_groups:
            ps = [p for p in self._params_with_grad(group) if p in ascended]
            for (device, dtype), bucket in buckets_of(ps).items():
                plan.append((group, bucket, ops.resolve("bsam_step", self.backend, device, dtype)[1]))
        stepped = {p for _, bucket, _ in plan for p in bucket}
        rest = [p for p in ascended if p not in stepped]
        if rest:
            self._restore_list(rest)
        for group, bucket, step in plan:
            beta1, beta2 = group["betas"]
            step(bucket, [self._backups[p] for p in bucket], [p.grad for p in bucket],
                 [self.state[p]["momentum"] for p in bucket], [self.state[p]["precision"] for p in bucket],
                 [self._scales[p] for p in bucket], group["lr"], beta1, beta2, group["weight_decay"],
                 group["damping"])
        self._stage = "idle"
        self._ascended = set()
        if zero_grad:
            self._clear_grads()

    def _restore_list(self, params) -> None:
        for (device, dtype), ps in buckets_of(params).items():
            _, fn = ops.resolve("restore", self.backend, device, dtype)
            fn(ps, [self._backups[p] for p in ps])

    @torch.no_grad()
    def restore(self) -> bool:
        """Put the clean weights back (after first_step or second_step) without updating."""
        if self._stage == "idle":
            return False
        self._restore_list([p for p in self._all_params() if p in self._backups])
        self._stage = "idle"
        self._ascended = set()
        return True

    def step(self, closure=None):
        """``first_step``, ``closure()``, ``second_step``, ``closure()``, ``third_step``.

        ``closure`` computes the loss and its gradients (``.grad`` is cleared before each call).
        Returns the loss at the perturbed weights. If the closure raises, the weights are restored.
        """
        if closure is None:
            raise RuntimeError("BSAM.step() needs a closure that computes the loss and its gradients "
                               "(or call first_step(), second_step() and third_step())")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        try:
            closure()
            self.second_step(zero_grad=True)
            loss = closure()
        except BaseException:
            self.restore()
            raise
        self.third_step()
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["fastsam"] = {"seed": self.seed,
                         "generators": {k: g.get_state() for k, g in self._generators.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if self._stage != "idle":
            raise RuntimeError("load_state_dict() in the middle of a BSAM step: call third_step() or restore() first")
        extra = state_dict.get("fastsam") or {}
        self._check_state_shapes(state_dict)  # before anything is loaded: a refused load changes nothing
        super().load_state_dict(state_dict)
        self.seed = int(extra.get("seed", self.seed))
        self._generators = {}
        for key, gen_state in (extra.get("generators") or {}).items():
            self._generator(torch.device(key)).set_state(gen_state)

    def _check_state_shapes(self, state_dict: dict) -> None:
        params = self._all_params()
        saved = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        index_to_param = dict(zip(saved, params))
        for i, entry in (state_dict.get("state") or {}).items():
            p = index_to_param.get(i)
            if p is None:
                continue  # torch's loader reports group mismatches itself
            for key in ("momentum", "precision"):
                t = entry.get(key)
                if isinstance(t, torch.Tensor) and t.shape != p.shape:
                    raise ValueError(f"BSAM.load_state_dict: parameter {params.index(p)} has shape {tuple(p.shape)} "
                                     f"but the checkpoint's {key} has shape {tuple(t.shape)}")

    def __getstate__(self):
        state = super().__getstate__()
        state.update(backend=self.backend, num_data=self.num_data, s_init=self.s_init, seed=self.seed,
                     _generator_states={k: g.get_state() for k, g in self._generators.items()})
        return state

    def __setstate__(self, state):
        gens = state.pop("_generator_states", {})
        super().__setstate__(state)
        self._generators, self._stage, self._backups, self._scales, self._ascended = {}, "idle", {}, {}, set()
        for key, gen_state in gens.items():
            self._generator(torch.device(key)).set_state(gen_state)
