"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022).

A full SAM step only every ``k`` steps; the steps between reuse what it learnt. With ``g`` the
gradient at ``w`` and ``g_s`` the SAM gradient (at ``w + e``), over the whole parameter set:

* SAM steps (steps 0, k, 2k, ... of the counter): the usual two passes and an update with ``g_s``;
  on the side, the part of ``g_s`` orthogonal to ``g`` is stored,

      g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||  =  g_s - (<g, g_s> / ||g||^2) g

* the ``k - 1`` steps between: one forward/backward, and an update with

      g + alpha * (||g|| / ||g_v||) * g_v

  i.e. the current gradient pushed by a sharpness direction of length ``alpha ||g||``.

So ``k - 1`` of every ``k`` steps cost one pass instead of two. Nothing is perturbed on those steps
and nothing is restored either (some public versions restore weights saved at the last SAM step on
every step, which silently undoes the cheap updates). ``g_v``, its squared norm and the step counter
are in ``state_dict()``, so a run resumed in the middle of a cycle continues exactly.

Cost: on SAM steps, ``g`` is kept in the ``g_v`` buffer itself (``g_v`` is computed over it in
place), then :func:`fastsam.ops.grad_dot` and :func:`fastsam.ops.looksam_orthogonal_`; on cheap
steps, :func:`fastsam.ops.grad_sq_norm` and :func:`fastsam.ops.looksam_combine_`. One extra buffer
the size of the parameters, and no host synchronisation.
"""

from __future__ import annotations

import torch

from fastsam.ops.gsam_combine import check_alpha

from ._variant_utils import (buckets_of, check_ops_registered, copy_grads_to_buffers, materialize_params,
                             reject_sparse, resolve_for, warn_if_base_option_shadowed)
from .sam import SAM, _check_every


_SAM_STEP_OPS = ("grad_dot", "looksam_orthogonal")
_CHEAP_STEP_OPS = ("grad_norm", "looksam_combine")


class LookSAM(SAM):
    r"""SAM every ``k`` steps, ``g + alpha (||g||/||g_v||) g_v`` in between; API of :class:`fastsam.SAM`.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as for :class:`fastsam.SAM` (``backend``,
            ``eta``, ``perturb_eps`` and the base optimizer's options included; ``every`` is ``k``).
        k: a SAM step every ``k`` steps (``k = 1``: every step, exactly SAM).
        alpha: weight of the reused sharpness direction on the cheap steps (``>= 0``). Stored as
            ``opt.alpha``, outside the param groups (see :class:`fastsam.GSAM` on base optimizers that
            also take an ``alpha``).

    Training loop: ``opt.needs_second_pass`` says (on the host, from the step counter) whether the
    coming step is a SAM step::

        loss_fn(model(x), y).backward()
        if opt.needs_second_pass:                  # every k-th step
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)            # cheap step: g + alpha (||g||/||g_v||) g_v

    ``opt.step(closure)`` does the same and calls the closure only on SAM steps. Calling
    ``first_step`` / backward / ``second_step`` on every step also works (``first_step`` perturbs
    nothing on a cheap step), without the saving.

    ``g_v`` covers the parameters with a gradient in both passes of the last SAM step; other
    parameters take their plain gradient on cheap steps. A SAM step with a non-finite gradient
    leaves ``g_v`` unusable and the cheap steps after it take the plain gradient until the next
    SAM step.
    """

    _supports_sharded_params = False  # not shard-aware yet (see fastsam/optim/_sharding.py)

    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.7,
                 adaptive: bool = False, **kwargs):
        if "every" in kwargs:
            raise TypeError("LookSAM takes k (the SAM-step interval), not every")
        _check_every("k", k)
        check_alpha(alpha)
        params = materialize_params(params)
        warn_if_base_option_shadowed("LookSAM", base_optimizer, "alpha", params)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, every=k, **kwargs)
        check_ops_registered("LookSAM", self.backend, _SAM_STEP_OPS + _CHEAP_STEP_OPS)
        self.alpha = float(alpha)
        # parameter -> buffer: g during a SAM step, g_v after it. _gv_sq_norm is ||g_v||^2 on the
        # device, or None while there is no usable g_v (before the first SAM step, during one).
        # g_v and its squared norm live in the step state (see sam.py's note on torch.compile).
        self._step_state.variant.update(gv={}, gv_sq_norm=None)

    @property
    def k(self) -> int:
        """A SAM step every ``k`` steps."""
        return self.every

    @k.setter
    def k(self, value: int) -> None:
        _check_every("k", value)
        self.every = value

    def first_step(self, zero_grad: bool = False, *, grad_scaler=None, loss=None) -> None:
        """SAM's ``first_step`` on SAM steps (keeping ``g``); nothing on cheap steps."""
        check_alpha(self.alpha)  # before anything changes
        if self.needs_second_pass and self._perturbed is None:
            # Resolve the second step's ops now: an unavailable backend raises before perturbing.
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            for op in _SAM_STEP_OPS:
                resolve_for(self.backend, op, buckets_of(params))
        # g_v = g_s - (<g, g_s>/||g||^2) g carries g_s's scale whatever g's, and cheap steps use
        # g_v / ||g_v||: LookSAM is loss-scale consistent with or without grad_scaler here.
        super().first_step(zero_grad=False, grad_scaler=grad_scaler, loss=loss)
        if not self._step_state.cheap_pending:
            # g goes into the g_v buffers, where looksam_orthogonal_ turns it into g_v in place.
            self._set_gv(copy_grads_to_buffers(self.backend, list(self._perturbed), self._gv), None)
        if zero_grad:
            self._clear_grads()

    @property
    def _gv(self) -> dict:
        """Parameter -> its stored g_v (the orthogonal component of the last SAM step)."""
        return self._step_state.variant.setdefault("gv", {})

    @property
    def _gv_sq_norm(self):
        return self._step_state.variant.get("gv_sq_norm")

    def _set_gv(self, gv: dict, sq_norm) -> None:
        self._step_state.variant["gv"] = gv
        self._step_state.variant["gv_sq_norm"] = sq_norm

    def _before_base_step(self, sam_step: bool) -> None:
        check_alpha(self.alpha)
        if sam_step:
            self._store_orthogonal_component()
        else:
            self._reuse_orthogonal_component()

    def _store_orthogonal_component(self) -> None:
        params = [p for p in self._perturbed if p.grad is not None]
        reject_sparse(type(self).__name__, params)
        self._step_state.variant["gv"] = {p: self._gv[p] for p in params}
        if not params:
            return
        buckets = buckets_of(params)
        dots, orthogonals = (resolve_for(self.backend, op, buckets) for op in _SAM_STEP_OPS)
        stats = None
        for key, ps in buckets.items():
            part = dots[key]([self._gv[p] for p in ps], [p.grad for p in ps])  # g (held in the buffer), g_s
            stats = part if stats is None else stats + part.to(stats.device, non_blocking=True)
        stats = self._reduce_sq_norm(stats)  # sums: the same cross-process reduction as a squared norm
        sq_norm = None
        for (device, dtype), ps in buckets.items():
            bufs = [self._gv[p] for p in ps]
            # gv and first_grads are the same buffers: g_v is written over g in place.
            part = orthogonals[(device, dtype)](bufs, [p.grad for p in ps], bufs,
                                                stats.to(device, non_blocking=True))
            sq_norm = part if sq_norm is None else sq_norm + part.to(sq_norm.device, non_blocking=True)
        self._step_state.variant["gv_sq_norm"] = self._reduce_sq_norm(sq_norm)

    def _reuse_orthogonal_component(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        reject_sparse(type(self).__name__, params)
        if self._gv_sq_norm is None or not params:
            return  # no g_v yet: a plain step
        buckets = buckets_of(params)
        sq_norms, combines = (resolve_for(self.backend, op, buckets) for op in _CHEAP_STEP_OPS)
        sq_norm_g = None
        for key, ps in buckets.items():
            part = sq_norms[key]([p.grad for p in ps], None, "plain", 0.0)
            sq_norm_g = part if sq_norm_g is None else sq_norm_g + part.to(sq_norm_g.device, non_blocking=True)
        sq_norm_g = self._reduce_sq_norm(sq_norm_g)
        for (device, dtype), ps in buckets.items():
            ps = [p for p in ps if p in self._gv]
            if not ps:
                continue
            combines[(device, dtype)]([p.grad for p in ps], [self._gv[p] for p in ps],
                                      sq_norm_g.to(device, non_blocking=True),
                                      self._gv_sq_norm.to(device, non_blocking=True), self.alpha)

    # ------------------------------------------------------------------ state

    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        if self._gv_sq_norm is not None:
            index = {p: i for i, p in enumerate(self._param_list())}
            extra["looksam_gv"] = {index[p]: buf for p, buf in self._gv.items()}
            extra["looksam_gv_sq_norm"] = self._gv_sq_norm
        return extra

    def _check_extra_state(self, extra: dict) -> None:
        # The saved g_v against the parameters, before anything is loaded.
        super()._check_extra_state(extra)
        saved = extra.get("looksam_gv") or {}
        params = self._param_list()
        for i, t in saved.items():
            ok = isinstance(i, int) and 0 <= i < len(params) and isinstance(t, torch.Tensor)
            if not ok or tuple(t.shape) != tuple(params[i].shape) or not t.is_floating_point():
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"the saved LookSAM g_v for parameter {i} (shape {shape}) does not match this "
                                 f"optimizer's parameters"
                                 + (f" (that parameter has shape {tuple(params[i].shape)})" if ok else ""))
        sq = extra.get("looksam_gv_sq_norm")
        if sq is not None and (not isinstance(sq, torch.Tensor) or sq.numel() != 1):
            raise ValueError(f"the saved LookSAM ||g_v||^2 must be a one-element tensor, got {sq!r}")

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        saved = extra.get("looksam_gv")
        if saved is None or extra.get("looksam_gv_sq_norm") is None:
            self._set_gv({}, None)
            return
        params = self._param_list()
        gv = {}
        for i, t in saved.items():
            p = params[int(i)]
            # Own copies on the parameter's device and dtype: the loaded dict may be reused or freed.
            gv[p] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(t)
        # fp32 scalars, fp64 when the parameters are fp64 (as the ops return them).
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        self._set_gv(gv, extra["looksam_gv_sq_norm"].detach().to(device=params[0].device, dtype=dtype).clone())

    _PICKLED = SAM._PICKLED + ("alpha",)
