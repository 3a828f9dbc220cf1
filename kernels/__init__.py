"""Triton kernels of fastsam (installed as ``fastsam.kernels``).

One file per op, named like the op in ``fastsam/ops/``; each holds the ``@triton.jit`` kernels and
the launcher the op's ``triton`` backend calls. Importing this package must not fail when only the
interpreter is available (``TRITON_INTERPRET=1`` on CPU).
"""

try:
    import triton  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != "triton":
        raise
    # One line that names the fix, instead of a bare "No module named 'triton'" from a kernel file.
    raise ModuleNotFoundError("fastsam.kernels needs Triton, which is not installed: pip install 'fastsam[triton]' "
                              "(the torch backend serves without it)", name="triton") from None

# Importing the op modules registers their torch.library ops (``torch.ops.fastsam.*_triton*``).
from . import (ema_direction, grad_mix, grad_norm, perturb, restore, restore_adamw_step,  # noqa: E402,F401
               restore_sgd_step, sds_select, sds_weights)
from . import per_tensor_norm, perturb_per_tensor  # noqa: E402,F401  (layer-wise perturbation: AWP, WT-AWP)
from . import momentum_sam, sampa_extrapolate  # noqa: E402,F401  (Momentum-SAM, SAMPa)
from . import bsam_ascent, bsam_noise, bsam_step  # noqa: E402,F401  (Bayesian SAM)
