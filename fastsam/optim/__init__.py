"""fastsam's optimizer layer: composes the ops, knows nothing about backends."""

from .aesam import AESAM
from .asam import ASAM
from .bsam import BSAM
from .awp import AWP
from .delta_sam import DeltaSAM
from .esam import ESAM
from .fisher_sam import FisherSAM
from .friendly_sam import FriendlySAM
from .gsam import GSAM
from .hero import HERO
from .ksam import KSAM
from .looksam import LookSAM
from .momentum_sam import MomentumSAM, MomentumSAMAdamW
from .msam import MSAM
from .rho_scheduler import RhoScheduler
from .rst import RandomSwitchSAM
from .sam import SAM
from .wsam import WSAM
from .sampa import SAMPa

__all__ = ["SAM", "ASAM", "FisherSAM", "ESAM", "MSAM", "GSAM", "LookSAM", "RhoScheduler"]
__all__ += ["MomentumSAM", "MomentumSAMAdamW", "AESAM", "RandomSwitchSAM", "KSAM", "SAMPa"]
__all__ += ["AWP", "HERO", "DeltaSAM"]
__all__ += ["WSAM", "FriendlySAM", "BSAM"]
