"""Which samples of an E3 batch are traced: run on to the final layer after their answer, to feed the controller.

In steady state a share ``sample_rate`` of samples, drawn uniformly before any exit is known, so the controller's
window is a uniform sample of the traffic. At that share the window fills ``1 / sample_rate`` times slower than in
latency mode, where every batch is traced: at 5 % the controller tunes once per 5,120 requests (a round needs 256 new
samples) and its window of 2,000 samples spans 40,000. Until then the plan's thresholds, chosen on the validation
split, are served all but unchecked, and served inputs are rarely distributed like that split (measured on MiniLM
SST-2, ``make bench-e3``: thresholds that agreed with the original model on 99.35 % of the held-out split served
98.75 % of the benchmark's 9,418 inputs; the controller had one round in the whole sweep, on 256 samples, too few to
tell 98.8 % from the budget).

So a router traces *every* sample of its first ``warmup`` samples, then the steady share: the controller tunes on
served traffic within the first few thousand requests after every (re)deployment, as it would in latency mode, and
the extra compute is bounded (those samples run the whole model, as the original model would). Both phases draw
without looking at any exit, so each phase's feedback is a uniform sample of its traffic.
"""

from __future__ import annotations

import numpy as np

#: Samples a router replica traces in full after loading (its ``warmup_traced`` parameter): the controller's default
#: window, so its first rounds judge the plan's thresholds on as many served samples as in latency mode.
WARMUP_TRACED = 2000


class TraceSampler:
    """Args:
    sample_rate: share of samples traced once the warm-up is over.
    warmup: samples traced in full first (0: none).
    rng: random source (tests seed it).
    """

    def __init__(self, sample_rate: float, warmup: int, rng: np.random.Generator | None = None) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.sample_rate = sample_rate
        self.warmup_left = warmup
        self.rng = rng or np.random.default_rng()

    def draw(self, n: int) -> np.ndarray:
        """Whether each of the next ``n`` samples is traced."""
        traced = self.rng.random(n) < self.sample_rate
        if self.warmup_left > 0:
            warm = min(n, self.warmup_left)
            traced[:warm] = True
            self.warmup_left -= warm
        return traced
