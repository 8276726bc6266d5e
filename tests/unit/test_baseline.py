import numpy as np
import pytest

from controller.baseline import FusedBaseline
from controller.latency import measured_exits
from controller.window import FeedbackWindow
from early_exit.feedback import BatchTiming, FeedbackRecord


def _record(ramps: tuple[int, ...], n: int, batch_ms: float, overhead_ms: float = 0.0,
            answer_ms: np.ndarray | None = None) -> FeedbackRecord:
    timing = BatchTiming(batch_ms, overhead_ms, 10.0, np.full(n, batch_ms) if answer_ms is None else answer_ms)
    return FeedbackRecord("m", 1, ramps, np.ones((len(ramps), n), np.float32), np.zeros((len(ramps), n), int),
                          np.zeros(n, int), np.zeros(n, int), timing)


def test_the_baseline_is_the_mean_of_the_latest_fused_batches_of_each_size() -> None:
    baseline = FusedBaseline(per_size=4, min_batches=2)
    baseline.add(_record((), 1, 5.0))
    baseline.add(_record((0,), 1, 50.0))  # served with a ramp: not the fused graph's time
    assert np.isnan(baseline.ms(np.array([1]))).all()  # one batch of size 1 is too few
    for batch_ms in (6.0, 7.0, 8.0, 9.0):
        baseline.add(_record((), 1, batch_ms))
    baseline.add(_record((), 2, 9.0))
    np.testing.assert_allclose(baseline.ms(np.array([1, 2, 1])), [7.5, np.nan, 7.5])  # latest four: 6..9 ms


def test_the_baseline_rejects_settings_that_could_never_give_an_estimate() -> None:
    with pytest.raises(ValueError, match="min_batches"):
        FusedBaseline(per_size=4, min_batches=5)


def test_ramps_slower_than_the_fused_graph_measure_a_loss_their_timed_work_does_not_show() -> None:
    """Batches with a ramp take 11 ms of which the backend timed 0.2 ms of early-exit work, and answer a quarter of
    their samples at 3 ms: by their own timings the exits save time; the fused graph meanwhile takes 9.5 ms, so the
    ramp's true cost is 1.5 ms a batch and the exits lose."""
    window = FeedbackWindow(capacity=100)
    answers = np.array([3.0, 11.0, 11.0, 11.0])
    for _ in range(4):
        window.add(_record((0,), 4, 11.0, overhead_ms=0.2, answer_ms=answers))
    view = window.view()
    rho = view.busy / (1 - view.busy)
    own = measured_exits(view).mean_saving_ms()  # the mean: the median request does not exit here
    assert own == pytest.approx(np.mean(10.8 - answers) - 0.2 * rho)
    assert own > 0
    baseline = FusedBaseline(min_batches=2)
    for _ in range(2):
        baseline.add(_record((), 4, 9.5))
    measured = measured_exits(view, baseline=baseline)
    assert measured.count == 16 and measured.mean_saving_ms() == pytest.approx(np.mean(9.5 - answers) - 1.5 * rho)
    assert measured.mean_saving_ms() < 0


def test_the_median_request_is_judged_against_its_own_batch_not_the_baselines_noise_free_mean() -> None:
    """Batches of one: 4 of 10 exit, answered at 4 ms (their pass would have taken 11 ms); the other 6 take 8-14 ms
    (the noise of the machine), 1 ms more than on the fused graph, whose batches take 10 ms on average. Against the
    baseline's mean, the noisy answers' median (8 ms) looks 2 ms faster than vanilla; against each batch's own time
    less the ramps' mean work, the median request (one that does not exit) is 1 ms slower, as it is."""
    window = FeedbackWindow(capacity=100)
    for _ in range(4):
        window.add(FeedbackRecord("m", 1, (0,), np.ones((1, 1), np.float32), np.zeros((1, 1), int),
                                  np.zeros(1, int), np.zeros(1, int), BatchTiming(4.0, 0.1, 10.0, np.full(1, 4.0),
                                                                                  tail_ms=7.0)))
    for batch_ms in (8.0, 10.0, 12.0, 14.0, 8.0, 14.0):
        window.add(_record((0,), 1, batch_ms, overhead_ms=0.1))
    baseline = FusedBaseline(min_batches=2)
    for batch_ms in (9.0, 11.0):
        baseline.add(_record((), 1, batch_ms))
    measured = measured_exits(window.view(), baseline=baseline)
    assert measured.overhead_ms == pytest.approx(1.0)  # (4 x 1 - 2 + 0 + 2 + 4 - 2 + 4) / 10 = 1.0 ms
    assert measured.median_in_batch_ms == pytest.approx(-1.0)
    assert measured.in_batch_ms == pytest.approx((4 * 6.0 - 6 * 1.0) / 10)



@pytest.mark.parametrize("fused_ms, may_pay", [((7.0, 12.0, 7.0, 12.0), True), ((9.5, 9.5, 9.5, 9.5), False)])
def test_a_loss_within_the_baselines_noise_is_no_evidence_that_exits_do_not_pay(
        fused_ms: tuple[float, ...], may_pay: bool) -> None:
    """Batches of one with a ramp, answered at their end in 9 or 11 ms: 0.5 ms slower than the fused graph's mean
    of 9.5 ms, and at 57 % busy that work delays the queue by 0.67 ms more: a loss of 1.17 ms by the point estimate
    either way. Measured on fused batches of 7 and 12 ms that mean is uncertain by 1.44 ms (its standard error),
    more than the loss; on batches of exactly 9.5 ms it is not."""
    window = FeedbackWindow(capacity=100)
    for batch_ms in (9.0, 11.0, 9.0, 11.0):
        window.add(_record((0,), 1, batch_ms))
    baseline = FusedBaseline(min_batches=2)
    for batch_ms in fused_ms:
        baseline.add(_record((), 1, batch_ms))
    assert baseline.variance_of_mean(np.array([1]))[0] == pytest.approx(np.var(fused_ms, ddof=1) / 4)
    assert np.isnan(baseline.variance_of_mean(np.array([2])))[0]  # no fused batch of 2: no estimate
    measured = measured_exits(window.view(), baseline=baseline)
    assert measured.in_batch_ms == pytest.approx(-0.5) and measured.saving_ms() < 0
    assert measured.se_ms == pytest.approx(np.sqrt(np.var(fused_ms, ddof=1) / 4))  # the samples' savings are equal
    assert not measured.may_pay(z=0.0)
    assert measured.may_pay(z=1.0) == may_pay
