"""fastsam's optimizer layer: composes the ops, knows nothing about backends."""

from .asam import ASAM
from .esam import ESAM
from .fisher_sam import FisherSAM
from .gsam import GSAM
from .looksam import LookSAM
from .momentum_sam import MomentumSAM, MomentumSAMAdamW
from .msam import MSAM
from .rho_scheduler import RhoScheduler
from .sam import SAM

__all__ = ["SAM", "ASAM", "FisherSAM", "ESAM", "MSAM", "GSAM", "LookSAM", "RhoScheduler"]
__all__ += ["MomentumSAM", "MomentumSAMAdamW"]
