"""fastsam's op layer: one schema per op, one implementation per backend.

Ops (each in its own file, same name as its kernel in ``kernels/`` and ``csrc/``):

=========================  ====================================================================
``grad_norm``              global norm: plain ``||g||``, adaptive ``||(|w|+eta) g||``, Fisher
``perturb_``               ``backup = w; w += rho * d / (norm + eps)`` (optionally SWP-masked)
``restore_``               ``w = backup`` in place
``restore_sgd_step_``      ``w = backup`` fused with a ``torch.optim.SGD`` step
``restore_adamw_step_``    ``w = backup`` fused with a ``torch.optim.AdamW`` step
``sds_select``             ESAM's data selection: indices of the k sharpest samples
``sds_weights``            its soft variant: softmax of the per-sample sharpness
``grad_dot``               ``(<a, b>, ||a||^2, ||b||^2)`` of two gradient lists in one pass
``gsam_combine_``          GSAM's direction ``g_p - alpha * g_perp``, in place
``looksam_orthogonal_``    LookSAM's ``g_v = g_s - (<g, g_s>/||g||^2) g`` and its squared norm
``looksam_combine_``       LookSAM's cheap-step direction ``g + alpha (||g||/||g_v||) g_v``, in place
``grad_mix_``              ``x <- a x + b y`` (or ``y <- a x + b y; x <- y_old``): WSAM's mixes, in place
``bsam_noise_``            bSAM's noisy weights ``backup = w; w += n / sqrt(N s)``
``bsam_ascent_``           bSAM's ascent ``w = backup + rho g / s`` and ``h = sqrt(s) |g|``
``bsam_step_``             bSAM's restore + momentum, weight and precision update
``ema_direction_``         FriendlySAM's ``d = g - sigma m`` with the EMA ``m <- lmbda m + (1-lmbda) g``
``per_tensor_norm``        ``[||x_0||, ..., ||x_{T-1}||]``: every tensor's own L2 norm (AWP, WT-AWP)
``perturb_per_tensor_``    ``backup = w; w += s_t * g`` with one device scale per tensor (layer-wise)
``momentum_sam_sgd_``      Momentum-SAM: back from the ascent point, SGD step, ``||v||^2`` (fused)
``momentum_sam_adamw_``    the same with the AdamW step
``momentum_sam_shift_``    ``w += scale * v`` (optionally backing ``w`` up): the ascent move
``sampa_extrapolate_``     SAMPa's ``y = w - lr (d + wd w + mu buf)`` with a backup of ``w``
=========================  ====================================================================

Every op accepts lists of tensors, splits them into (device, dtype) buckets and runs a constant
number of launches per bucket, whatever the number of tensors. Results stay on the device.
See ``_dispatch.py`` for how a backend is chosen.
"""

from ._dispatch import (
    BACKENDS,
    ENV_VAR,
    BackendUnavailableError,
    auto_order,
    backend_status,
    check_backend,
    implementations,
    register,
    resolve,
    set_auto_order,
    supports,
)
from ._autotune import autotune
from .bsam_ascent import bsam_ascent_
from .bsam_noise import bsam_noise_
from .bsam_step import bsam_step_
from .ema_direction import ema_direction_
from .grad_dot import grad_dot
from .grad_mix import grad_mix_
from .grad_norm import MODES, grad_norm, grad_sq_norm
from .gsam_combine import gsam_combine_
from .looksam_combine import looksam_combine_, looksam_orthogonal_
from .per_tensor_norm import per_tensor_norm, per_tensor_sq_norms
from .momentum_sam import momentum_sam_adamw_, momentum_sam_sgd_, momentum_sam_shift_
from .sampa_extrapolate import sampa_extrapolate_
from .perturb import perturb_
from .perturb_per_tensor import perturb_per_tensor_
from .restore import restore_
from .restore_adamw_step import restore_adamw_step_
from .restore_sgd_step import restore_sgd_step_
from .sds_select import sds_k, sds_select, sds_weights

__all__ = [
    "BACKENDS", "ENV_VAR", "MODES", "BackendUnavailableError", "auto_order", "backend_status", "check_backend",
    "implementations", "register", "resolve", "set_auto_order", "supports", "autotune",
    "grad_norm", "grad_sq_norm", "perturb_", "restore_", "restore_sgd_step_", "restore_adamw_step_",
    "sds_k", "sds_select", "sds_weights",
    "grad_dot", "gsam_combine_", "grad_mix_", "ema_direction_", "looksam_orthogonal_", "looksam_combine_",
    # layer-wise perturbation (AWP, WT-AWP)
    "per_tensor_norm", "per_tensor_sq_norms", "perturb_per_tensor_",
    "momentum_sam_sgd_", "momentum_sam_adamw_", "momentum_sam_shift_", "sampa_extrapolate_",
    "bsam_noise_", "bsam_ascent_", "bsam_step_",
]
