import numpy as np

from controller.prepare.pipeline import answerable_share


def test_answerable_share_takes_the_most_confident_samples_while_they_keep_the_floor() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    agrees = np.array([1, 1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=bool)
    # top 4 all agree; the 5th drops the top-k to 80 %; the top 8 are back at 7/8 = 87.5 %
    assert answerable_share(confidence, agrees, 1.0) == 0.4
    assert answerable_share(confidence, agrees, 0.85) == 0.8
    assert answerable_share(confidence, agrees, 0.65) == 1.0


def test_a_ramp_whose_most_confident_sample_disagrees_answers_nothing_at_a_strict_floor() -> None:
    assert answerable_share(np.array([0.9, 0.1]), np.array([False, True]), 0.99) == 0.0
    assert answerable_share(np.array([0.9, 0.1]), np.array([False, True]), 0.5) == 1.0
