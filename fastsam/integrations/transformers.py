"""Hugging Face ``Trainer`` with any fastsam optimizer: :class:`SAMTrainer` (or :class:`SAMTrainerMixin`
for a Trainer subclass of your own). Needs ``pip install 'fastsam[transformers]'``.

    from fastsam.integrations.transformers import SAMTrainer
    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                         sam_class=fastsam.SAM, sam_kwargs=dict(rho=0.05))
    trainer.train()

The base optimizer is the one ``TrainingArguments`` asks for (``optim``, ``learning_rate``,
``weight_decay`` with the Trainer's no-decay groups), wrapped by ``sam_class`` over the *same* param
groups, so the Trainer's LR scheduler acts on fastsam's groups; an optimizer passed as
``optimizers=(fastsam.SAM(...), None)`` works too.

How a training step runs (``training_step`` is called once per micro-batch, ``optimizer.step()``
once per accumulation window):

* **Two-pass optimizers** (SAM, ASAM, FisherSAM, GSAM, LookSAM, interval SAM): each micro-batch's
  first forward/backward is the Trainer's own, so the first-pass gradient is the accumulated one.
  On the window's last micro-batch ``first_step`` perturbs (given the Trainer's GradScaler, so
  fp16 gradients are unscaled where the variant needs it), then the second forward/backward runs
  over every micro-batch of the window at ``w + e`` (the same loss scaling by the accumulation
  steps, the same autocast, DDP's all-reduce only on the last). The Trainer then clips that
  second-pass gradient (``max_grad_norm``) and calls ``optimizer.step()``, i.e. ``second_step``
  (restore + base step; under fp16 through ``GradScaler.step``, unscale and skip on the device).
  Steps that need no second pass (``needs_second_pass`` False: LookSAM between its SAM steps,
  interval SAM) run one pass, as the plain Trainer does.
* **Pass-driving optimizers** (ESAM, MSAM, DeltaSAM, KSAM, HERO: ``closure(indices=None) -> per-sample losses``):
  the window's micro-batches are buffered and, on the last one, ``optimizer.step(closure)`` runs
  the whole step over the window as one batch. The closure gets per-sample losses from the model's
  logits (:meth:`SAMTrainerMixin.per_sample_losses`; override it for other heads); ``indices``
  select samples across the window (with gradient accumulation that mapping reads the ``k``
  selected indices on the host once per step; without it, none). The second-pass gradient is
  clipped and the GradScaler's ``grad_scale``/``found_inf`` are set by a hook right before the
  base step (:meth:`fastsam.SAM.register_base_step_pre_hook`); the Trainer's own
  ``optimizer.step()`` then finds the step done. Under fp16 the closure's losses carry the
  GradScaler's scale (created here on the first step, which the plain Trainer does in its backward);
  ΔSAM's sample weights and HERO's penalty get ``loss_scale=`` to undo it where it is not linear. These optimizers call ``backward`` themselves, so
  DeepSpeed (which owns backward) is not supported for them.

Logged losses are the first-pass losses, as the plain Trainer logs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import transformers

import fastsam

__all__ = ["SAMTrainer", "SAMTrainerMixin", "per_sample_losses_from_logits", "drives_its_passes"]


def drives_its_passes(optimizer) -> bool:
    """Whether a fastsam optimizer runs every pass itself from ``closure(indices=None) -> per-sample losses``."""
    drivers = tuple(getattr(fastsam, name) for name in ("ESAM", "MSAM", "DeltaSAM", "KSAM", "HERO") if hasattr(fastsam, name))
    return isinstance(optimizer, drivers)


def per_sample_losses_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, problem_type: str | None = None,
                                  shift: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """One loss per sample (1-D, fp32) from a Hugging Face head's logits and its labels.

    * ``logits`` ``[B, C]``, integer ``labels`` ``[B]``: cross entropy (single-label classification);
      ``problem_type="multi_label_classification"``: mean binary cross entropy over the labels;
      ``"regression"`` (or one output with float labels): mean squared error.
    * ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` (token classification, language modelling; ``shift``
      for causal LMs, whose token ``t`` predicts label ``t + 1``): mean cross entropy over each sample's
      tokens whose label is not ``ignore_index`` (0 for a sample without any).
    """
    logits = logits.float()
    if logits.dim() == 3:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
        count = (labels != ignore_index).sum(dim=1).clamp(min=1)
        return tokens.sum(dim=1) / count
    if logits.dim() != 2:
        raise ValueError(f"per-sample losses need logits of shape [B, C] or [B, T, V], got {tuple(logits.shape)}")
    if problem_type == "regression" or (problem_type is None and logits.shape[1] == 1 and labels.is_floating_point()):
        diff = logits - labels.float().reshape(logits.shape)
        return (diff * diff).mean(dim=1)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=1)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")


def _batch_size(inputs: dict) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("a batch without tensors: cannot tell its size")


def _take(inputs: dict, indices: torch.Tensor, size: int) -> dict:
    """The rows ``indices`` of every per-sample tensor of a batch (other entries as they are)."""
    return {k: v.index_select(0, indices.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() > 0
            and v.shape[0] == size else v for k, v in inputs.items()}


class _StepAlreadyTaken(torch.optim.Optimizer):
    """What the Trainer steps for a pass-driving optimizer: the step ran in ``training_step``, so ``step()``
    does nothing; param groups, state, ``state_dict`` and ``zero_grad`` are the wrapped optimizer's (the
    LR scheduler and checkpoints act on it). ``GradScaler.step`` sees ``_step_supports_amp_scaling`` and
    calls ``step()`` without unscaling again; its ``update()`` still reads the overflow check the
    Trainer's clipping made."""

    _step_supports_amp_scaling = True

    def __init__(self, inner: fastsam.SAM):
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.inner = inner

    # Read through, not copied: load_state_dict (accelerate's device placement does one) replaces the
    # wrapped optimizer's param_groups and state objects, and the LR scheduler must see the new ones.
    def _through(name):  # noqa: N805
        def get(self):
            return getattr(self.inner, name) if "inner" in self.__dict__ else self.__dict__["_own_" + name]

        def set_(self, value):
            if "inner" in self.__dict__:
                setattr(self.inner, name, value)
            else:
                self.__dict__["_own_" + name] = value

        return property(get, set_)

    param_groups = _through("param_groups")
    state = _through("state")
    defaults = _through("defaults")
    del _through

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)

    def __repr__(self):
        return f"{type(self).__name__}({self.inner!r})"


class SAMTrainerMixin:
    """Runs the passes of a fastsam optimizer inside ``transformers.Trainer.training_step``.

    Put it before the Trainer class: ``class MyTrainer(SAMTrainerMixin, transformers.Trainer)``.
    Keyword arguments: ``sam_class`` (a fastsam optimizer class, default :class:`fastsam.SAM`) and
    ``sam_kwargs`` (its options: ``rho``, ``adaptive``, ESAM's ``beta``/``gamma``, ...), used when
    the Trainer builds its optimizer; ignored when an optimizer is passed in (it must be a fastsam one).
    """

    def __init__(self, *args, sam_class=None, sam_kwargs: dict | None = None, **kwargs):
        self.sam_class = sam_class or fastsam.SAM
        if not (isinstance(self.sam_class, type) and issubclass(self.sam_class, fastsam.SAM)):
            raise TypeError(f"sam_class must be a fastsam optimizer class (fastsam.SAM, fastsam.ESAM, ...), "
                            f"got {sam_class!r}")
        self.sam_kwargs = dict(sam_kwargs or {})
        self._sam_window: list = []
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ the optimizer

    @property
    def sam_optimizer(self) -> fastsam.SAM | None:
        """The fastsam optimizer (the Trainer's ``optimizer`` may be a thin wrapper around it)."""
        opt = getattr(self, "optimizer", None)
        opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer
        return opt.inner if isinstance(opt, _StepAlreadyTaken) else opt

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            base = super().create_optimizer(model)  # what TrainingArguments ask for, with no-decay groups
            self.optimizer = self.sam_class(base.param_groups, base, **self.sam_kwargs)
        opt = self.sam_optimizer
        if not isinstance(opt, fastsam.SAM):
            raise TypeError(f"{type(self).__name__} needs a fastsam optimizer of the SAM family (a fastsam.SAM "
                            f"subclass), got {type(opt).__name__}; pass sam_class=... or "
                            "optimizers=(fastsam.SAM(...), None). (MomentumSAM and SAMPa have step contracts of "
                            "their own and are not driven by this Trainer.)")
        if drives_its_passes(opt) and not isinstance(self.optimizer, _StepAlreadyTaken):
            if getattr(self, "is_deepspeed_enabled", False):
                raise NotImplementedError(f"{type(opt).__name__} runs its own backward passes; DeepSpeed is not "
                                          "supported with it")
            self.optimizer = _StepAlreadyTaken(opt)
        return self.optimizer

    # ------------------------------------------------------------------ per-sample losses

    def per_sample_losses(self, model, inputs: dict) -> torch.Tensor:
        """Per-sample losses of a batch for ESAM/MSAM/DeltaSAM/KSAM: the model's logits through
        :func:`per_sample_losses_from_logits` (labels popped from the inputs, so the model computes
        no loss of its own). Override for heads that are not covered."""
        inputs = dict(inputs)
        label_names = getattr(self, "label_names", None) or ["labels"]
        labels = inputs.pop(label_names[0])
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        unwrapped = self.accelerator.unwrap_model(model)
        config = getattr(unwrapped, "config", None)
        shift = type(unwrapped).__name__.endswith("ForCausalLM")
        return per_sample_losses_from_logits(logits, labels, problem_type=getattr(config, "problem_type", None),
                                             shift=shift)

    # ------------------------------------------------------------------ the training step

    def _scaled_for_accumulation(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """The Trainer's own loss bookkeeping before backward (multi-GPU mean, accumulation scaling)."""
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def _second_pass(self, model, inputs, num_items_in_batch, sync: bool) -> None:
        sync_context = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
        with sync_context:
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            self.accelerator.backward(self._scaled_for_accumulation(loss, num_items_in_batch))

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self.sam_optimizer
        if drives_its_passes(opt):
            return self._driven_training_step(opt, model, inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)  # the first pass, the Trainer's own
        self._sam_window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss
        window, self._sam_window = self._sam_window, []
        if opt.needs_second_pass:
            opt.first_step(zero_grad=True, grad_scaler=self.accelerator.scaler)
            try:
                model.train()
                for i, (mb_inputs, n_items) in enumerate(window):
                    self._second_pass(model, mb_inputs, n_items, sync=i == len(window) - 1)
            except BaseException:
                opt.restore()
                raise
        return loss  # then the Trainer clips this window's second-pass gradient and calls second_step

    def _driven_training_step(self, opt, model, inputs):
        self._sam_window.append(inputs)
        if not self.accelerator.sync_gradients:
            # Nothing runs before the window is complete; the step's loss is returned on its last micro-batch.
            return torch.zeros((), device=self.args.device)
        window, self._sam_window = [self._prepare_inputs(x) for x in self._sam_window], []
        model.train()
        scaler = self.accelerator.scaler
        # The loss scale as a device tensor (no sync). GradScaler creates it lazily at its first scale()
        # call, which the plain Trainer makes in backward and this path never does: make that call here.
        scale = scaler.scale(torch.ones((), device=self.args.device)) if scaler is not None and scaler.is_enabled() \
            else None
        sizes = [_batch_size(mb) for mb in window]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]

        def losses_of(mb, size, rows=None):
            with self.compute_loss_context_manager():
                losses = self.per_sample_losses(model, mb if rows is None else _take(mb, rows, size))
            return losses if scale is None else losses * scale.to(losses.device)

        def closure(indices=None):
            if indices is None:
                return torch.cat([losses_of(mb, n) for mb, n in zip(window, sizes)])
            if len(window) == 1:
                return losses_of(window[0], sizes[0], indices)
            # Map window-wide indices to (micro-batch, row): one host read of the k selected indices.
            wanted = indices.tolist()
            parts, order = [], []
            for mb, n, start in zip(window, sizes, offsets):
                rows = [(pos, i - start) for pos, i in enumerate(wanted) if start <= i < start + n]
                if rows:
                    order += [pos for pos, _ in rows]
                    parts.append(losses_of(mb, n, torch.tensor([r for _, r in rows], device=indices.device)))
            losses = torch.cat(parts)
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            return losses.index_select(0, inverse.to(losses.device))

        handle = opt.register_base_step_pre_hook(lambda o: self._before_driven_base_step(o, model, scale))
        try:
            if isinstance(opt, fastsam.MSAM):  # MSAM splits the batch into shards before its first closure call
                loss = opt.step(closure, batch_size=sum(sizes))
            elif isinstance(opt, (fastsam.DeltaSAM, fastsam.HERO)):  # their weighting / penalty unscale it
                loss = opt.step(closure, loss_scale=scale)
            else:
                loss = opt.step(closure)
        finally:
            handle.remove()
            for name in ("grad_scale", "found_inf"):
                if hasattr(opt, name):
                    delattr(opt, name)
        # The window's mean first-pass loss, unscaled: what the plain Trainer's micro-batch losses add up to.
        return loss.detach() if scale is None else loss.detach() / scale.to(loss.device)

    def _before_driven_base_step(self, opt, model, scale) -> None:
        """Clip the (possibly loss-scaled) second-pass gradient and set the GradScaler protocol's device
        tensors, as ``GradScaler.step`` and the Trainer's clipping would for a two-call optimizer."""
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        true_norm = norm if scale is None else norm / scale.to(norm.device)
        max_norm = self.args.max_grad_norm
        if max_norm and max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for group in opt.param_groups for p in group["params"]],
                                                 max_norm, true_norm)
        if scale is not None:
            opt.grad_scale = scale
            opt.found_inf = (~torch.isfinite(norm)).to(torch.float32)


class SAMTrainer(SAMTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` running a fastsam optimizer's passes (see :class:`SAMTrainerMixin`)."""
