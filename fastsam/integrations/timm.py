"""timm with fastsam: :func:`create_sam` builds timm's optimizer (``timm.optim.create_optimizer_v2``:
its optimizer names, no weight decay on biases and norms, layer decay) and wraps it in a fastsam
optimizer over the same param groups, so timm's schedulers, which set ``lr`` on
``optimizer.param_groups``, drive it unchanged. Needs ``pip install 'fastsam[timm]'``.

    from fastsam.integrations.timm import create_sam
    optimizer = create_sam(model, opt="sgd", lr=0.1, weight_decay=5e-4, rho=0.05)
    scheduler, epochs = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=90)

The training step is fastsam's usual two-call form, with ``torch.amp`` if wanted
(``examples/sam_timm.py``).
"""

from __future__ import annotations

import timm.optim

import fastsam

__all__ = ["create_sam"]


def create_sam(model_or_params, opt: str = "sgd", lr: float | None = None, weight_decay: float = 0.0,
               momentum: float = 0.9, *, sam_class=None, rho: float = 0.05, sam_kwargs: dict | None = None,
               **timm_kwargs) -> fastsam.SAM:
    """A fastsam optimizer (``sam_class``, default :class:`fastsam.SAM`; ``rho`` and ``sam_kwargs`` are its
    options, e.g. ``adaptive=True`` or ESAM's ``beta``/``gamma``) around the optimizer timm's
    ``create_optimizer_v2(model_or_params, opt, lr, weight_decay, momentum, **timm_kwargs)`` builds."""
    sam_class = sam_class or fastsam.SAM
    if not (isinstance(sam_class, type) and issubclass(sam_class, fastsam.SAM)):
        raise TypeError(f"sam_class must be a fastsam optimizer class (fastsam.SAM, fastsam.ASAM, ...), got {sam_class!r}")
    base = timm.optim.create_optimizer_v2(model_or_params, opt=opt, lr=lr, weight_decay=weight_decay,
                                          momentum=momentum, **timm_kwargs)
    return sam_class(base.param_groups, base, rho=rho, **(sam_kwargs or {}))
