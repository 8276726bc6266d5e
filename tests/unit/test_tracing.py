"""The E3 router's choice of traced samples: every sample of the warm-up, then a uniform share."""

from __future__ import annotations

import numpy as np
import pytest

from early_exit.tracing import TraceSampler


def test_every_sample_of_the_warmup_is_traced_across_batches_then_the_share() -> None:
    sampler = TraceSampler(0.1, warmup=25, rng=np.random.default_rng(0))
    assert sampler.draw(10).all() and sampler.draw(10).all()
    straddling = sampler.draw(10)
    assert straddling[:5].all()  # the warm-up's last five
    later = np.concatenate([sampler.draw(8) for _ in range(2000)])
    assert 0.08 < later.mean() < 0.12


def test_without_warmup_only_the_share_is_traced() -> None:
    sampler = TraceSampler(0.0, warmup=0)
    assert not sampler.draw(100).any()


@pytest.mark.parametrize(("share", "warmup"), [(-0.1, 0), (1.5, 0), (0.1, -1)])
def test_settings_out_of_range_are_refused(share: float, warmup: int) -> None:
    with pytest.raises(ValueError):
        TraceSampler(share, warmup)
