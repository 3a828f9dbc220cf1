"""fastsam's optimizer layer: composes the ops, knows nothing about backends."""

from .asam import ASAM
from .bsam import BSAM
from .esam import ESAM
from .fisher_sam import FisherSAM
from .friendly_sam import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM
from .rho_scheduler import RhoScheduler
from .sam import SAM
from .wsam import WSAM

__all__ = ["SAM", "ASAM", "FisherSAM", "ESAM", "MSAM", "GSAM", "LookSAM", "RhoScheduler", "WSAM", "FriendlySAM", "BSAM"]
