"""fastsam's optimizer layer: composes the ops, knows nothing about backends."""

from .asam import ASAM
from .fisher_sam import FisherSAM
from .gsam import GSAM
from .looksam import LookSAM
from .rho_scheduler import RhoScheduler
from .sam import SAM

__all__ = ["SAM", "ASAM", "FisherSAM", "GSAM", "LookSAM", "RhoScheduler"]
