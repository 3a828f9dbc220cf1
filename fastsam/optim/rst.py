"""RST, randomized sharpness-aware training (Zhao, Zhang & Hu, "Randomized Sharpness-Aware Training
for Boosting Computational Efficiency in Deep Learning", 2022): each step is a SAM step with
probability ``p_t`` (a Bernoulli trial), a plain base step otherwise.

``p_t`` follows a schedule: constant ``probability`` (default 0.5, half the SAM steps, the paper's
headline setting), or, with ``final_probability`` and ``total_steps``, the linear schedule
``p_t = probability + (final_probability - probability) * min(t / total_steps, 1)``.

[note: RST's draws]
The trial of step ``t`` is a pure function of ``(seed, t)``: ``u_t = splitmix64(seed + t * golden) / 2**64``
and the step is a SAM step iff ``u_t < p_t``. It is drawn on the host, so ``needs_second_pass`` costs
no device synchronisation, and the whole generator state is the seed plus the step counter, both in
``state_dict()["fastsam"]``: a resumed run makes the same choices as an uninterrupted one. ``seed``
defaults to a draw from torch's global generator (so ``torch.manual_seed`` fixes it).
"""

from __future__ import annotations

import math

import torch

from .esam import _GOLDEN, _M64, _splitmix64
from .sam import SAM


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1) or math.isnan(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class RandomSwitchSAM(SAM):
    r"""RST: a SAM step with probability ``p_t``, a plain base step otherwise (host draw, no sync).

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as for :class:`fastsam.SAM`.
        probability: ``p`` (constant schedule) or the schedule's starting value.
        final_probability: with ``total_steps``, ``p_t`` goes linearly to this value.
        total_steps: length of the linear schedule, in steps.
        seed: the generator seed (an int); ``None`` draws one from torch's global generator.

    The loop is interval SAM's: ``if opt.needs_second_pass:`` around the second pass, or
    ``opt.step(closure)``.
    """

    _supports_sharded_params = True  # the decision is host-only and identical on every rank with one seed

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 probability: float = 0.5, final_probability: float | None = None, total_steps: int | None = None,
                 seed: int | None = None, **kwargs):
        probability = _probability("probability", probability)
        if final_probability is not None:
            final_probability = _probability("final_probability", final_probability)
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"a linear schedule (final_probability) needs total_steps, an int >= 1; "
                                 f"got {total_steps!r}")
        elif total_steps is not None:
            raise ValueError("total_steps only applies with final_probability (the linear schedule)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if kwargs.get("every", 1) != 1:
            raise ValueError("RandomSwitchSAM draws every step itself; every=k (interval SAM) is not supported")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.probability, self.final_probability, self.total_steps = probability, final_probability, total_steps
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed = seed & _M64

    def probability_at(self, step: int) -> float:
        """``p_t`` of step ``step``."""
        if self.final_probability is None:
            return self.probability
        return self.probability + (self.final_probability - self.probability) * min(step / self.total_steps, 1.0)

    def draw(self, step: int) -> float:
        """``u_t`` in [0, 1), the uniform draw of step ``step``."""
        return _splitmix64((self.seed + step * _GOLDEN) & _M64) / 2.0 ** 64

    def is_sam_step(self, step: int) -> bool:
        return self.draw(step) < self.probability_at(step)

    @property
    def needs_second_pass(self) -> bool:
        """Whether the coming step is a SAM step: the seeded host draw of this step (no device sync)."""
        return self.is_sam_step(self._step_state.step_count)

    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        extra["rst_seed"] = self.seed
        return extra

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        if "rst_seed" in extra:
            self.seed = int(extra["rst_seed"])

    _PICKLED = SAM._PICKLED + ("probability", "final_probability", "total_steps", "seed")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", probability={self.probability}, " \
                                         f"final_probability={self.final_probability})"
