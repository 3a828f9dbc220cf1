"""Utilities around the optimizers (BatchNorm handling, ...)."""

from .batchnorm import disable_running_stats, enable_running_stats, frozen_running_stats

__all__ = ["disable_running_stats", "enable_running_stats", "frozen_running_stats"]
