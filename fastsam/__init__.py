"""fastsam: Sharpness-Aware Minimization with fused kernels.

Drop-in optimizers (``fastsam.SAM`` has the signature and semantics of the widely used PyTorch SAM
class), built on a small op layer (``fastsam.ops``) with interchangeable backends: Triton and CUDA
kernels on GPUs, and a pure-torch backend that gives the same results on any device.
"""

from . import ops
from .optim import ASAM, SAM, FisherSAM
from .optim import ESAM, MSAM
from . import distributed
from . import sharpness
from .optim import GSAM, LookSAM, RhoScheduler
from .optim import MomentumSAM, MomentumSAMAdamW
from .optim import AESAM, RandomSwitchSAM
from .optim import KSAM, SAMPa
from .optim import AWP, HERO, DeltaSAM
from .optim import WSAM, FriendlySAM, BSAM
from .utils import disable_running_stats, enable_running_stats, frozen_running_stats
from .version import __version__

__all__ = [
    "SAM", "ASAM", "FisherSAM",
    "ESAM", "MSAM", "distributed", "sharpness",
    "GSAM", "LookSAM", "RhoScheduler",
    "MomentumSAM", "MomentumSAMAdamW",
    "AESAM", "RandomSwitchSAM", "KSAM", "SAMPa",
    "AWP", "HERO", "DeltaSAM",
    "WSAM", "FriendlySAM", "BSAM",
    "ops", "frozen_running_stats", "disable_running_stats", "enable_running_stats",
    "__version__",
]
