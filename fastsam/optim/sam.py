"""SAM: Sharpness-Aware Minimization (Foret et al., "Sharpness-Aware Minimization for Efficiently
Improving Generalization", ICLR 2021), the drop-in optimizer every other fastsam optimizer builds on.

One SAM step, with ``g`` the gradient at ``w`` over all parameters of the optimizer:

    e  = rho * g / (||g|| + eps)                 (first_step: norm, backup, w += e)
    g' = grad L(w + e)                           (the caller's second forward/backward)
    w  = backup; base optimizer step with g'     (second_step)

``adaptive=True`` is ASAM's scale-invariant version (Kwon et al., ICML 2021): with ``T = |w| + eta``,
``e = rho * T^2 g / (||T g|| + eps)``. ``adaptive_params`` says which tensors get ``T``: ``"all"``
(default, as the widely used PyTorch SAM class does) or ``"weights"``, the rule of the ASAM
authors' code (SamsungLabs/ASAM), which the paper's experiments ran: only parameters whose name
contains ``"weight"`` are scaled, biases and normalisation shifts get ``T = 1`` (their ``g`` enters
the norm and the perturbation as in SAM). It needs names, i.e. ``model.named_parameters()`` (or
param groups with ``"param_names"``), which every fastsam optimizer accepts as torch's do.

``every=k`` is interval SAM: only every k-th step (steps 0, k, 2k, ... of the counter kept in
``state_dict()``) is a SAM step; the others are plain base steps with one forward/backward, the
cheapest way to trade sharpness-awareness for speed. ``needs_second_pass`` says on the host, from
that counter, whether the coming step perturbs.

The arithmetic runs in fastsam's fused ops (``fastsam.ops``); this class only decides what to
run. No host synchronisation happens inside a step: the norm, the scale and the non-finite flag
stay on the device, and weights are restored by an in-place copy.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch

from fastsam import ops
from fastsam.distributed import check_dp_perturbation
from fastsam.ops.grad_norm import check_mode

from . import _checkpoint, _sharding
from .base_step import fused_base_step_for


@dataclass
class _Bucket:
    """Parameters that share one device, one dtype and the same perturbation hyper-parameters."""

    device: torch.device
    dtype: torch.dtype
    mode: str
    rho: float
    eta: float
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)


@dataclass
class _StepState:
    """What a step leaves for the next call: the perturbed parameters (-> their backups), the norm.

    [note: optimizer attributes under torch.compile]
    torch.compile (dynamo) traces Optimizer objects specially and, as of torch 2.13, silently drops
    plain attribute assignments made on them inside a compiled region. Everything a step writes
    therefore lives on this small plain object (and in dicts mutated in place), whose attribute
    writes dynamo does replay. Subclasses keep their own per-step state the same way.
    """

    perturbed: dict | None = None
    grad_norm: torch.Tensor | None = None
    perturbation_skipped: torch.Tensor | None = None
    step_count: int = 0  # completed steps, SAM and cheap (interval SAM); saved in state_dict()
    cheap_pending: bool = False  # first_step/second_step of a step that perturbs nothing
    variant: dict = field(default_factory=dict)  # subclasses' per-step tensors (GSAM's g, LookSAM's g_v)
    # Per-step sharpness (see SAM.sharpness): the loss at w given to first_step, then
    # L(w + e) - L(w) once second_step knows the perturbed loss too. Device tensors, never read.
    first_loss: torch.Tensor | None = None
    sharpness: torch.Tensor | None = None


def _check_loss(name: str, loss):
    """A scalar loss (a one-element tensor or a number), detached; None passes. Checks only metadata."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{name} must be the scalar loss (a one-element tensor, e.g. the batch mean), got a "
                             f"tensor of shape {tuple(loss.shape)}")
        if loss.requires_grad:
            loss = loss.detach()
        return loss if loss.dim() == 0 else loss.reshape(())  # no op at all for a detached 0-dim loss
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"{name} must be a scalar loss (a tensor or a number), got {type(loss).__name__}")
    return torch.tensor(float(loss))


ADAPTIVE_PARAMS = ("all", "weights")


def _check_adaptive_params(group) -> None:
    rule = group.get("adaptive_params", "all")
    if rule not in ADAPTIVE_PARAMS:
        raise ValueError(f"adaptive_params must be one of {ADAPTIVE_PARAMS}, got {rule!r}")
    if rule == "weights" and group.get("adaptive") and "param_names" not in group:
        raise ValueError('adaptive_params="weights" scales only parameters whose name contains "weight", so it '
                         "needs parameter names: pass model.named_parameters() (or groups with 'param_names')")


def _check_every(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _scale_of(grad_scaler):
    """A GradScaler's current scale as a device tensor (no host sync), or None when it is disabled."""
    if not grad_scaler.is_enabled():
        return None
    return grad_scaler._get_scale_async()  # the scale tensor itself; get_scale() would sync


def _check_nonneg(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer (drop-in for the common PyTorch SAM).

    Args:
        params: parameters or param groups, as for any optimizer. Groups may set their own
            ``rho``, ``adaptive`` and ``eta`` besides the base optimizer's options.
        base_optimizer: the optimizer *class* (e.g. ``torch.optim.SGD``), instantiated over the same
            param groups with ``**kwargs``, or an already built optimizer over the same parameters.
        rho: neighbourhood radius (``>= 0``).
        adaptive: ASAM's adaptive perturbation, ``T = |w| + eta``.
        eta: ASAM's offset in ``T`` (0 reproduces the widely used SAM class's ``adaptive=True``).
        adaptive_params: with ``adaptive``, which tensors ``T`` applies to: ``"all"`` or ``"weights"``
            (names containing ``"weight"``, the ASAM authors' rule; needs named parameters).
        perturb_eps: ``eps`` in ``rho / (norm + eps)``.
        every: interval SAM: a SAM step every ``every``-th step, a plain base step otherwise (1: always SAM).
        backend: ``"auto"`` (default; ``FASTSAM_BACKEND`` may override it), ``"torch"``, ``"triton"``
            or ``"cuda"``. An explicit backend that cannot run raises with the reason.
        dp_perturbation: under data parallelism, ``"global"`` (default: the first-pass gradient is
            averaged across ranks before perturbing) or ``"local"`` (each rank perturbs with its own
            gradient, i.e. mSAM with one shard per rank); see :mod:`fastsam.distributed`.
        **kwargs: options of the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    Use either the two-call form::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    or ``loss = opt.step(closure)`` after the first backward, where ``closure`` runs the second
    forward/backward and returns the loss (weights are restored if it raises).

    After ``first_step``, ``grad_norm`` holds the (device) norm used and ``perturbation_skipped`` a
    device bool that is True when the gradient was not finite and the weights were left as they were.

    Per-step sharpness for free: give the step both losses it already has and ``sharpness`` holds
    ``L(w + e) - L(w)`` (the SAM objective's sharpness term, Foret et al. eq. 1) as a device tensor,
    computed without a host sync::

        loss = loss_fn(model(x), y); loss.backward()
        opt.first_step(zero_grad=True, loss=loss)                 # L(w), optional
        loss_p = loss_fn(model(x), y); loss_p.backward()
        opt.second_step(zero_grad=True, loss=loss_p)              # L(w + e), optional
        opt.sharpness                                             # loss_p - loss, on the device

    or ``opt.step(closure, loss=loss)`` (``loss`` is the first-pass loss at ``w``; the closure's
    return value is the perturbed loss). ``fastsam.sharpness.SharpnessLog`` collects it.
    ``state_dict()`` carries the base optimizer's state (momentum, Adam moments).

    With ``every > 1`` (and in subclasses with cheap steps, such as LookSAM) some steps need no
    second pass. ``needs_second_pass`` (a host bool from the step counter, no device sync) says
    whether the coming step is a SAM step. ``step(closure)`` calls the closure only then. In the
    two-call form, either keep calling both (on a cheap step ``first_step`` perturbs nothing and
    ``second_step`` steps with whatever gradient is there, correct but without the saving), or skip
    the second pass::

        loss_fn(model(x), y).backward()
        if opt.needs_second_pass:
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)    # on a cheap step: no first_step needed
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 eta: float = 0.0, perturb_eps: float = 1e-12, backend: str | None = "auto",
                 dp_perturbation: str = "global", every: int = 1, adaptive_params: str = "all", **kwargs):
        _check_every("every", every)
        _check_nonneg("rho", rho)
        _check_nonneg("eta", eta)
        _checkpoint.check_perturb_eps(perturb_eps)
        self._sam_defaults = dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta))
        if adaptive_params != "all":  # kept out of the groups unless used: stock state dicts stay stock
            self._sam_defaults["adaptive_params"] = adaptive_params
        base_is_instance = isinstance(base_optimizer, torch.optim.Optimizer)
        if base_is_instance and kwargs:
            raise TypeError(f"base_optimizer is an optimizer instance, so options {sorted(kwargs)} cannot be "
                            f"applied to it; pass them when building it (or pass its class)")
        if not base_is_instance and not (isinstance(base_optimizer, type)
                                         and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")
        self.backend = ops.check_backend(backend)
        self.dp_perturbation = check_dp_perturbation(dp_perturbation)
        self.perturb_eps = float(perturb_eps)
        super().__init__(params, dict(self._sam_defaults, **kwargs))
        for group in self.param_groups:
            self._check_group(group)

        if base_is_instance:
            mine = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if mine != theirs:
                raise ValueError("base_optimizer was built over different parameters than the ones given to SAM")
            for group in base_optimizer.param_groups:
                for k, v in self._sam_defaults.items():
                    group.setdefault(k, v)
                self._check_group(group)
            self.base_optimizer = base_optimizer
        else:
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        # One set of param groups and one state for both optimizers: LR schedulers and
        # state_dict() see the base optimizer's hyper-parameters and momentum/moments.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._fused_base = fused_base_step_for(self.base_optimizer)
        self._backups: dict = {}
        self._step_state = _StepState()
        self._every = int(every)
        self._base_step_pre_hooks: collections.OrderedDict = collections.OrderedDict()  # weakref-able, for RemovableHandle
        self._shard_groups = _sharding.shard_groups(self._param_list())
        if self._shard_groups and not self._supports_sharded_params:
            raise NotImplementedError(f"{type(self).__name__} does not support sharded (FSDP/DTensor) parameters yet; "
                                      "SAM, ASAM and FisherSAM do")

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The global norm the last ``first_step`` used (0-dim fp32 on the device; fp64 for fp64 weights), or None."""
        return self._step_state.grad_norm

    @property
    def perturbation_skipped(self) -> torch.Tensor | None:
        """Device bool: True when the last first-pass gradient was not finite and nothing moved."""
        return self._step_state.perturbation_skipped

    @property
    def sharpness(self) -> torch.Tensor | None:
        """``L(w + e) - L(w)`` of the last step (0-dim, detached, on the losses' device), or None.

        Filled by ``second_step`` when both losses were given (``first_step(loss=...)`` and
        ``second_step(loss=...)``, or ``step(closure, loss=...)``); optimizers that run their own
        passes (ESAM, MSAM) always fill it. None after a step that lacked either loss and after a
        cheap step (interval SAM, LookSAM's reuse steps), which has no perturbed point. The value
        is never read on the host by fastsam.
        """
        return self._step_state.sharpness

    @property
    def _perturbed(self) -> dict | None:
        return self._step_state.perturbed

    # ------------------------------------------------------------------ hooks for subclasses

    def _norm_mode(self, group) -> str:
        """Which norm/perturbation geometry a group uses: plain, adaptive (ASAM) or fisher."""
        return "adaptive" if group["adaptive"] else "plain"

    def _swp_args(self, bucket: _Bucket, offset: int) -> tuple[float, int, int]:
        """(beta, seed, counter offset) for stochastic weight perturbation; SAM perturbs everything."""
        return 1.0, 0, offset

    def _reduce_sq_norm(self, sq_norm: torch.Tensor) -> torch.Tensor:
        """Combine per-rank partial sums across processes: sharded (FSDP) parameters only.

        Replicated data parallelism needs nothing here: with DDP the gradients are already averaged
        (global perturbation) or deliberately local (``dp_perturbation="local"``).
        """
        if self._shard_groups:
            return _sharding.all_reduce_sum_(sq_norm, self._shard_groups)
        return sq_norm

    # GradScaler protocol: ``scaler.step(opt)`` sets ``opt.grad_scale`` / ``opt.found_inf`` (device
    # tensors) and calls ``opt.step()``, which finishes the SAM step: the fused base step unscales and
    # skips on the device, so AMP adds no host sync (see ``second_step``).
    _step_supports_amp_scaling = True
    # FSDP: SAM, ASAM and FisherSAM run on local shards; variants with extra per-step buffers opt in
    # once they do too.
    _supports_sharded_params = True

    def _before_base_step(self, sam_step: bool) -> None:
        """Rewrite ``.grad`` into the update direction just before the restore and base step.

        ``sam_step`` is False on a cheap step (nothing perturbed). Validate before modifying: if this
        raises, ``second_step`` restores the weights and re-raises. SAM uses the gradient as it is.
        """

    def _after_base_step(self, sam_step: bool) -> None:
        """Runs right after the base optimizer's step (weights restored and stepped), in ``second_step``.

        For updates applied outside the base optimizer (WSAM's decoupled sharpness term). It must honour
        ``self._amp_scale_args()`` (a skipped base step skips it too). SAM does nothing here.
        """

    def register_base_step_pre_hook(self, hook) -> "torch.utils.hooks.RemovableHandle":
        """Run ``hook(optimizer)`` in every ``second_step`` once ``.grad`` holds the update's gradient
        (after the variant's own rewrite, e.g. GSAM's combination), before the restore and base step.

        For training loops that hand the whole step to a pass-driving optimizer (``ESAM.step``,
        ``MSAM.step``) but must still clip or unscale the second-pass gradient, or set the
        ``grad_scale``/``found_inf`` device tensors of the GradScaler protocol, at that point
        (:mod:`fastsam.integrations.transformers` does). The hook may modify ``.grad`` in place; if it
        raises, the weights are restored and the exception propagates. Returns a handle whose
        ``remove()`` unregisters it. Hooks are not part of ``state_dict()`` or pickling.
        """
        handle = torch.utils.hooks.RemovableHandle(self._base_step_pre_hooks)
        self._base_step_pre_hooks[handle.id] = hook
        return handle

    # ------------------------------------------------------------------ interval SAM

    @property
    def every(self) -> int:
        """A SAM step every ``every``-th step; the steps between are cheap (one pass)."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        _check_every("every", value)
        self._every = int(value)

    @property
    def needs_second_pass(self) -> bool:
        """Whether the coming step is a SAM step (perturbs, so needs a second forward/backward).

        Decided on the host from the step counter: steps 0, every, 2 every, ... are SAM steps.
        """
        return self._step_state.step_count % self._every == 0

    def _start_cheap_step(self) -> None:
        st = self._step_state
        st.perturbed = {}  # "first_step done, nothing perturbed": second_step restores nothing
        st.cheap_pending = True
        st.grad_norm = st.perturbation_skipped = None

    # ------------------------------------------------------------------ validation

    def _check_group(self, group) -> None:
        _check_nonneg("rho", group.get("rho"))
        _check_nonneg("eta", group.get("eta"))
        check_mode(self._norm_mode(group), group["eta"])
        _check_adaptive_params(group)
        _checkpoint.check_rho_over_eps(group["rho"], self.__dict__.get("perturb_eps", 1e-12))

    def add_param_group(self, param_group: dict) -> None:
        _checkpoint.check_no_duplicates(param_group, self.__dict__.get("param_groups", []))
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
            return
        for k, v in self._sam_defaults.items():
            param_group.setdefault(k, v)
        self._check_group(param_group)
        base.add_param_group(param_group)  # appends to the shared list of groups

    # ------------------------------------------------------------------ the two steps

    def _perturbation_buckets(self) -> list[_Bucket]:
        """Group parameters with gradients; validates everything before anything is modified."""
        buckets: dict[tuple, _Bucket] = {}
        checking = not torch.compiler.is_compiling()  # validated eagerly; a compiled step trusts its groups
        for group in self.param_groups:
            if checking:
                self._check_group(group)
            mode, rho, eta = self._norm_mode(group), float(group["rho"]), float(group["eta"])
            names = group.get("param_names") if mode == "adaptive" and group.get("adaptive_params") == "weights" \
                else None
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                # The ASAM authors' rule: T = |w| + eta for "weight" tensors only, the others as in SAM.
                tensor_mode = mode if names is None or "weight" in names[i] else "plain"
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter of shape {tuple(p.shape)})")
                key = (p.get_device(), p.dtype, tensor_mode, rho, eta)  # get_device(): an int, cheap per tensor
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(p.device, p.dtype, tensor_mode, rho, eta)
                b.params.append(p)
                b.grads.append(g)
        return list(buckets.values())

    def _backup_for(self, p: torch.Tensor) -> torch.Tensor:
        b = self._backups.get(p)
        w = self._local(p)
        # Re-allocated only if the parameter changed shape, dtype or device since the last step.
        if b is None or b.shape != w.shape or b.dtype is not w.dtype or b.get_device() != w.get_device():
            b = self._backups[p] = torch.empty_like(w, memory_format=torch.preserve_format)
        return b

    def _local(self, t):
        """The tensor the ops work on: this rank's shard for FSDP/DTensor parameters, else ``t``."""
        return _sharding.local(t) if self._shard_groups else t

    def _locals(self, ts) -> list:
        return _sharding.local_list(ts) if self._shard_groups else ts

    def _global_norm(self, buckets: list[_Bucket]) -> torch.Tensor:
        total = None
        for b in buckets:
            _, fn = ops.resolve("grad_norm", self.backend, b.device, b.dtype)
            part = fn(self._locals(b.grads), self._locals(b.params), b.mode, b.eta)
            total = part if total is None else total + part.to(total.device, non_blocking=True)
        return self._reduce_sq_norm(total).sqrt()

    def _perturb(self, buckets: list[_Bucket], norm: torch.Tensor) -> None:
        fns = [ops.resolve("perturb", self.backend, b.device, b.dtype)[1] for b in buckets]  # before any change
        perturbed: dict = {}
        offset = 0
        try:
            for b, fn in zip(buckets, fns):
                backups = [self._backup_for(p) for p in b.params]
                beta, seed, start = self._swp_args(b, offset)
                fn(self._locals(b.params), self._locals(b.grads), backups, norm.to(b.device, non_blocking=True),
                   b.rho, b.mode, b.eta, self.perturb_eps, beta, seed, start)
                offset += sum(p.numel() for p in b.params)
                perturbed.update(zip(b.params, backups))
        except BaseException:
            # Buckets already perturbed go back; the failing one was rejected before its launch.
            self._copy_back(perturbed)
            raise
        self._step_state.perturbed = perturbed

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler=None, loss=None) -> None:
        """Compute the global norm, back the weights up and move them to ``w + e``.

        ``loss``: optionally the first-pass loss ``L(w)`` (scalar, unscaled), kept on the device so that
        ``second_step(loss=L(w + e))`` can fill :attr:`sharpness`.

        ``grad_scaler``: the ``torch.amp.GradScaler`` (or its scale, a device tensor) that scaled the
        first-pass loss. The gradients are then unscaled in place, on the device, before perturbing.
        SAM's and ASAM's directions do not depend on the scale, so they do not need it; Fisher SAM's
        ``1 + eta g^2`` does. Non-finite gradients skip the perturbation either way.
        """
        if self._perturbed is not None:
            raise RuntimeError(f"{type(self).__name__}.first_step() was called twice without second_step(); "
                               "call second_step() (or restore()) before perturbing again")
        loss = _check_loss("first_step(loss=...)", loss)
        self._step_state.first_loss = loss if self.needs_second_pass else None
        if not self.needs_second_pass:
            # A cheap step: perturb nothing. second_step steps with the gradient present then.
            self._start_cheap_step()
            if zero_grad:
                self._clear_grads()
            return
        self._step_state.cheap_pending = False
        buckets = self._perturbation_buckets()
        if grad_scaler is not None and buckets:
            self._unscale_first_pass(buckets, grad_scaler)
        st = self._step_state
        if not buckets:  # no gradients at all: nothing to perturb, second_step is a plain base step
            st.perturbed, st.grad_norm, st.perturbation_skipped = {}, None, None
        else:
            norm = self._global_norm(buckets)
            st.grad_norm = norm
            st.perturbation_skipped = ~torch.isfinite(norm)
            self._perturb(buckets, norm)
        if zero_grad:
            self._clear_grads()

    def _unscale_first_pass(self, buckets: list[_Bucket], grad_scaler) -> None:
        scale = grad_scaler if isinstance(grad_scaler, torch.Tensor) else _scale_of(grad_scaler)
        if scale is None:  # a disabled scaler
            return
        for b in buckets:
            torch._foreach_div_(self._locals(b.grads), scale.to(b.device, non_blocking=True))

    @torch.no_grad()
    def restore(self) -> bool:
        """Undo ``first_step``'s perturbation without stepping. Returns whether anything was restored.

        If the restore op raises, the weights are copied back tensor by tensor before the error
        propagates: the model is never left at ``w + e``.
        """
        perturbed = self._step_state.perturbed
        if perturbed is None:
            return False
        self._restore_weights(perturbed)
        self._step_state.perturbed = None
        return True

    def _restore_weights(self, perturbed: dict) -> None:
        """``p = backup`` for every entry, with the restore op (a constant number of launches per bucket)."""
        buckets: dict[tuple, tuple[list, list]] = {}
        for p, b in perturbed.items():
            ps, bs = buckets.setdefault((p.device, p.dtype), ([], []))
            ps.append(self._local(p))
            bs.append(b)
        try:
            for (device, dtype), (ps, bs) in buckets.items():
                _, fn = ops.resolve("restore", self.backend, device, dtype)
                fn(ps, bs)
        except BaseException:
            self._copy_back(perturbed)
            raise

    @torch.no_grad()
    def _copy_back(self, perturbed: dict) -> None:
        """Error path only: ``p.copy_(backup)`` one tensor at a time, relying on nothing but torch."""
        for p, b in perturbed.items():
            self._local(p).copy_(b)

    def _abort_step(self) -> None:
        """An error mid-step: put every still-perturbed weight back and forget the step."""
        st = self._step_state
        perturbed, st.perturbed, st.cheap_pending = st.perturbed, None, False
        st.first_loss = None
        if perturbed:
            self._copy_back(perturbed)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss=None) -> None:
        """Restore the weights and take the base optimizer's step with the perturbed-point gradient.

        ``loss``: optionally the second-pass loss ``L(w + e)``; with ``first_step(loss=L(w))`` it sets
        :attr:`sharpness` to their difference (on the device, no sync).
        """
        loss = _check_loss("second_step(loss=...)", loss)
        if self._perturbed is None:
            if self.needs_second_pass:
                raise RuntimeError(f"{type(self).__name__}.second_step() called without a preceding first_step(): "
                                   "the weights are not perturbed, so there is nothing to restore")
            self._start_cheap_step()  # the one-pass form of a cheap step
        # [note: errors in second_step] Whatever raises in here (the variant's combine, the
        # GradScaler handling, the restore, the base step), every weight that is still perturbed is
        # copied back from its backup before the exception propagates; the step does not count.
        sam_step = not self._step_state.cheap_pending
        try:
            self._before_base_step(sam_step=sam_step)
            for hook in list(self._base_step_pre_hooks.values()):
                hook(self)
            if self._fused_base is None:
                self.restore()
                self._generic_base_step()
            else:
                self._fused_second_step()
            self._after_base_step(sam_step)
        except BaseException:
            self._abort_step()
            raise
        st = self._step_state
        first_loss, st.first_loss = st.first_loss, None
        st.sharpness = None
        if first_loss is not None and loss is not None and not st.cheap_pending:
            st.sharpness = loss - first_loss  # device op (a 0-dim CPU number broadcasts)
        self._step_state.perturbed = None
        self._step_state.cheap_pending = False
        self._step_state.step_count += 1
        self._mark_stepped()
        if zero_grad:
            self._clear_grads()

    def _fused_second_step(self) -> None:
        perturbed = self._perturbed
        plan = []
        restore_only = dict(perturbed)
        for group in self.param_groups:
            buckets: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:  # second_step restores the weights
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter of shape {tuple(p.shape)}); the weights were restored")
                backup = restore_only.pop(p, p)  # a parameter that was not perturbed is its own backup
                key = (p.get_device(), p.dtype)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = ([], [], [])
                bucket[0].append(p)
                bucket[1].append(g)
                bucket[2].append(backup)
            plan.extend((group, ps, gs, bs) for ps, gs, bs in buckets.values())
        grad_scale, found_inf = self._amp_scale_args()
        # Every bucket's state is checked and its op resolved before any weight changes.
        runs = [(ps, self._fused_base.plan_bucket(self, group, ps[0].device, ps[0].dtype, ps, gs, bs, grad_scale,
                                                  found_inf))
                for group, ps, gs, bs in plan]
        if restore_only:
            self._restore_weights(restore_only)
        # From here on, perturbed holds what is still perturbed, so an error restores exactly that.
        still = self._step_state.perturbed = {p: b for p, b in perturbed.items() if p not in restore_only}
        for ps, run in runs:
            run()
            for p in ps:
                still.pop(p, None)

    def _generic_base_step(self) -> None:
        """The base optimizer's own ``step()``, unscaling and skipping for a GradScaler first.

        Without a fused path the skip is a host decision: it reads ``found_inf`` once, which is the
        same synchronisation ``GradScaler.step`` makes for any optimizer it has to unscale itself.
        """
        grad_scale, found_inf = self._amp_scale_args()
        if grad_scale is not None:
            grads: dict = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        g = self._local(p.grad)
                        grads.setdefault((g.device, g.dtype), []).append(g)
            for (device, _), gs in grads.items():
                torch._foreach_div_(gs, grad_scale.to(device, non_blocking=True))
        if found_inf is not None and bool(found_inf.item()):
            return
        self.base_optimizer.step()

    def _clear_grads(self) -> None:
        """``zero_grad(set_to_none=True)`` without leaving a compiled region.

        ``Optimizer.zero_grad`` is excluded from torch.compile tracing (a graph break); setting the
        gradients to None directly is traceable and does the same.
        """
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _amp_scale_args(self):
        """(grad_scale, found_inf) device tensors for the base step, when a GradScaler set them.

        A first pass that overflowed (perturbation skipped) also skips the update: the second pass
        then ran at the unperturbed weights, which is not a SAM step.
        """
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        skipped = self._step_state.perturbation_skipped
        if found_inf is not None and skipped is not None:
            found_inf = torch.maximum(found_inf, skipped.to(device=found_inf.device, dtype=found_inf.dtype))
        return grad_scale, found_inf

    def _mark_stepped(self) -> None:
        # LR schedulers warn when optimizer.step() was never called; the two-call form counts as a step.
        self._opt_called = True
        self.base_optimizer._opt_called = True

    def step(self, closure=None, *, loss=None, perturbed_loss=None):
        """``first_step``, ``closure()`` (second forward/backward, returns the loss), ``second_step``.

        Gradients at ``w`` must already be in ``.grad``. Returns the closure's loss. If the closure
        raises, the weights are restored before the exception propagates. On a cheap step
        (``needs_second_pass`` False) the closure is not called, the step uses the gradients in
        ``.grad``, and the return value is None.

        ``loss``: optionally the first-pass loss ``L(w)`` the caller computed before the call. With
        it, :attr:`sharpness` is the closure's (perturbed) loss minus ``loss``, on the device.
        ``perturbed_loss``: without a closure (finishing a step begun by ``first_step(loss=...)``,
        e.g. ``scaler.step(opt, perturbed_loss=loss_p)``, which GradScaler passes on), ``L(w + e)``.
        """
        if closure is None:
            if self._perturbed is not None or not self.needs_second_pass:
                # After first_step (e.g. through GradScaler.step, which passes no closure) or on a
                # cheap step: finish the step.
                self.second_step(loss=perturbed_loss)
                return None
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure that recomputes the loss and its "
                               "gradients at the perturbed weights (or call first_step() and second_step())")
        if not self.needs_second_pass:
            self.second_step()
            return None
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True, loss=loss)
        try:
            perturbed_loss = closure()
        except BaseException:
            self._abort_step()
            raise
        measurable = isinstance(perturbed_loss, torch.Tensor) and perturbed_loss.numel() == 1
        self.second_step(loss=perturbed_loss if measurable else None)
        return perturbed_loss

    # ------------------------------------------------------------------ state

    # state_dict() key for fastsam's own state (the step counter, subclasses' buffers); torch's
    # Optimizer.load_state_dict ignores keys it does not know, and a stock state dict lacks it.
    EXTRA_STATE_KEY = "fastsam"

    def _extra_state(self) -> dict:
        """fastsam's state beyond torch's (``state``/``param_groups``); subclasses extend it."""
        return {"step": self._step_state.step_count}

    def _load_extra_state(self, extra: dict) -> None:
        # A state dict without it (e.g. a stock optimizer's) starts a fresh cycle: a SAM step first.
        self._step_state.step_count = int(extra.get("step", 0))

    def state_dict(self) -> dict:
        """torch's ``state``/``param_groups`` (the base optimizer's state included) plus fastsam's own.

        Refused between ``first_step`` and ``second_step``: the weights are at ``w + e`` then, and a
        checkpoint of them would have nothing to undo the perturbation. To checkpoint mid-step (a
        preemption handler, say), undo or finish the step first::

            opt.restore()                  # back to w; the step is dropped (redo its passes after resuming)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

        or call ``opt.second_step()`` (the step completes) and then save.
        """
        if self._perturbed:
            raise RuntimeError(f"{type(self).__name__}.state_dict() between first_step() and second_step(): the "
                               "weights are perturbed (w + e), so a checkpoint would save the perturbed weights. "
                               "Call restore() (drops the step) or second_step() (finishes it) first, then save")
        state_dict = super().state_dict()
        state_dict[self.EXTRA_STATE_KEY] = self._extra_state()
        return state_dict

    def _param_list(self) -> list:
        """Parameters in state_dict() order (group by group), the indices fastsam's state uses."""
        return [p for group in self.param_groups for p in group["params"]]

    def _check_extra_state(self, extra: dict) -> None:
        """Check fastsam's extra state against this optimizer before anything is loaded; subclasses extend it."""
        if not isinstance(extra, dict):
            raise ValueError(f"the state dict's {self.EXTRA_STATE_KEY!r} entry must be a dict, got "
                             f"{type(extra).__name__}")
        step = extra.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"the saved fastsam step counter must be an int >= 0, got {step!r}")

    def _checked_state_dict(self, state_dict: dict) -> dict:
        """A copy of ``state_dict`` ready for torch's loader, or a clear error; modifies nothing.

        See [note: what load_state_dict checks] in ``_checkpoint.py``.
        """
        from .base_step import ADAMW_STATE_KEYS, FusedAdamWStep

        adamw = isinstance(self._fused_base, FusedAdamWStep)
        out = _checkpoint.checked_state_dict(self, state_dict, self._check_group,
                                             complete=ADAMW_STATE_KEYS if adamw else (), numeric_step_to_tensor=adamw)
        self._check_extra_state(state_dict.get(self.EXTRA_STATE_KEY) or {})
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, checked first and atomic: a refused or failed load leaves the optimizer as it was.

        See [note: what load_state_dict checks] in ``_checkpoint.py``. A stock ``torch.optim`` state
        dict (e.g. of ``SGD(momentum=0.9)`` or ``AdamW``) and a davda54/sam-style one load too;
        fastsam's keys they lack keep this optimizer's values.
        """
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(): the weights are "
                               "perturbed; call second_step() or restore() first")
        state_dict = self._checked_state_dict(state_dict)

        def load():
            super(SAM, self).load_state_dict(state_dict)
            self._load_extra_state(state_dict.get(self.EXTRA_STATE_KEY) or {})
            self.base_optimizer.state = self.state
            self.base_optimizer.param_groups = self.param_groups
            for group in self.param_groups:
                self._check_group(group)
            self._fused_base = fused_base_step_for(self.base_optimizer)

        base = self.base_optimizer
        saved_base = (base.param_groups, base.state)
        try:
            _checkpoint.atomic_load(self, load, mutable=(self._step_state,))
        except BaseException:
            base.param_groups, base.state = saved_base
            raise

    # Attributes that pickling/deepcopy must carry besides torch's (defaults, state, param_groups).
    _PICKLED = ("base_optimizer", "backend", "perturb_eps", "_sam_defaults", "_step_state", "dp_perturbation",
                "_every")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_step_state" not in self.__dict__:
            self._step_state = _StepState()
        self.__dict__.setdefault("_every", 1)  # pickled before interval SAM existed
        self._base_step_pre_hooks = collections.OrderedDict()
        self._backups = dict(self._step_state.perturbed or {})
        self._shard_groups = _sharding.shard_groups(self._param_list()) if "param_groups" in self.__dict__ else []
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.state = self.state
            self.base_optimizer.param_groups = self.param_groups
            self._fused_base = fused_base_step_for(self.base_optimizer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, backend={self.backend!r}, " \
               f"groups={len(self.param_groups)})"
