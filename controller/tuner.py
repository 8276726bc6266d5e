"""Accuracy-constrained threshold tuning (paper §3.2) with incremental evaluation of moves.

The paper's greedy hill-climbing: every round tries lowering each ramp's threshold by that ramp's step (or down to
the next confidence value seen, so plateaus are crossed), keeps the moves the accuracy guard admits and that improve
the estimated latency saving, and applies the one that costs the least accuracy per unit of saving (ties: the larger
saving). A ramp whose move is taken doubles its step; when no move is acceptable every step halves; tuning ends when
every step is below ``min_step``. Two climbs run per tuning: one from "no exits" (moves only lower thresholds, so
this is the climb that can close a ramp again after a drift) and, when the guard admits them on the window, one from
the thresholds in use (so configurations do not churn when nothing changed); the better result is kept. More cold
climbs with other initial steps cost a full climb each and, on synthetic 4-16-ramp windows, found on average at most
1.2 % more saving (under 0.4 % of vanilla latency).

Why it is fast: a move on ramp ``r`` only changes the samples whose confidence at ``r`` lies between the old and the
new threshold and that did not already exit earlier. With each ramp's samples pre-sorted by confidence, that band is
a contiguous run of positions, and each position holds what moving its sample to ``r`` would gain; so one round
prices every candidate move with one range sum per ramp (a single ``reduceat``), and taking a move rewrites only the
moved samples' entries, one per ramp. Gathering every band each round instead took 13.7 ms per tuning where this
takes 9.2 ms (MiniLM's feedback, 11 ramps x 2,000 samples, same process): on such feedback the first rounds' bands
hold most of the window. The sort itself is a radix sort of the confidences' bits (``descending_order``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from controller.guard import AccuracyGuard
from early_exit.exit_rule import NEVER_EXIT, TIGHTEST_OPEN, any_exit, first_exit


@dataclass(frozen=True)
class TunerSettings:
    """Args:
    guard: accuracy budget and confidence level.
    initial_steps: initial step size of each climb from "no exits" (one climb per entry).
    min_step: stop when every step is below this.
    max_rounds: safety bound on hill-climbing rounds per climb.
    churn_ms: a climb from scratch replaces the climb from the current thresholds only when it saves this much more
        (milliseconds per sample), so equivalent configurations are not republished.
    """

    guard: AccuracyGuard = AccuracyGuard()
    initial_steps: tuple[float, ...] = (0.1,)
    min_step: float = 0.001
    max_rounds: int = 400
    churn_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.initial_steps or min(self.initial_steps) <= 0:
            raise ValueError(f"initial_steps must be positive, got {self.initial_steps}")
        if self.min_step <= 0:
            raise ValueError(f"min_step must be positive, got {self.min_step}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")


@dataclass(frozen=True)
class Evaluation:
    """Outcome of a threshold vector on a window: agreement (point estimate), the mean and the median sample's
    saving against the final layer's answer with the same ramps (their heads are paid either way; less them, the
    saving against the model without ramps), and exit shares."""

    accuracy: float
    saving_ms: float
    exit_rates: np.ndarray  # per active ramp, then final
    median_saving_ms: float = 0.0

    @property
    def assured_saving_ms(self) -> float:
        """The smaller of the mean and the median sample's saving: what a ramp set must offer to pay by the
        controller's rule for measured exits (``MeasuredExits.saving_ms``). The mean alone favours shallow ramps that
        a minority of inputs take, while every other input pays for their heads: on ResNet-56 ramps at 41-52 % depth
        modelled a 20 % mean saving and a 2 % median loss, where one of them with a ramp at 74 % depth modelled 24 %
        and 25 %."""
        return min(self.saving_ms, self.median_saving_ms)


def evaluate(thresholds: np.ndarray, confidence: np.ndarray, correct: np.ndarray, exit_ms: np.ndarray) -> Evaluation:
    """Agreement and savings of ``thresholds`` ``[R]`` on ``confidence`` / ``correct`` ``[R, N]``, with
    ``exit_ms`` ``[R + 1]`` the latency of answering at each ramp and at the final layer."""
    n = confidence.shape[1]
    if n == 0:
        return Evaluation(1.0, 0.0, np.zeros(len(exit_ms)))
    first = first_exit(confidence, thresholds)
    agree = np.append(correct, np.ones((1, n), dtype=bool), axis=0)[first, np.arange(n)]
    rates = np.bincount(first, minlength=len(exit_ms)) / n
    latency = exit_ms[first]
    return Evaluation(float(agree.mean()), float(exit_ms[-1] - latency.mean()), rates,
                      float(exit_ms[-1] - np.median(latency)))


def descending_order(confidence: np.ndarray) -> np.ndarray:
    """Per row of ``confidence`` ``[R, N]`` (float32, no NaN), the column indices in descending order.

    Why not ``np.argsort``: its comparison sort of 16 x 2,000 float32 took 2.4 ms, a quarter of a tuning, where numpy's
    stable sort of 16-bit keys is a radix sort; two stable passes over the float's bits (low half, then high half)
    give the same order in 1.0 ms.
    """
    bits = np.ascontiguousarray(confidence, dtype=np.float32).view(np.uint32)
    # Order-preserving float32 -> uint32 (negative values: every bit flipped; the others: sign bit set), then inverted
    # so that ascending keys are descending confidences.
    key = ~np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31))
    low = np.argsort((key & 0xFFFF).astype(np.uint16), axis=1, kind="stable")
    high = np.take_along_axis((key >> 16).astype(np.uint16), low, axis=1)
    return np.take_along_axis(low, np.argsort(high, axis=1, kind="stable"), axis=1)


class _Climb:
    """Hill-climbing state on one window, with each ramp's samples sorted by descending confidence.

    Every ``[R, N]`` table is flattened ramp after ramp, so ramp ``r``'s samples in confidence order sit at positions
    ``r * N`` to ``r * N + N``. A threshold is tracked as ``start[r]``, the position of the first sample that does not
    clear it, and the band a move shifts is positions ``start[r]:new_start``. Each position holds what moving its
    sample to ``r`` would change (agreeing answers, milliseconds; zero once the sample exits at ``r`` or earlier), so
    a candidate move is one range sum, and taking a move rewrites only the moved samples' entries.
    """

    def __init__(self, confidence: np.ndarray, prediction: np.ndarray, final: np.ndarray, exit_ms: np.ndarray):
        # float32, as the backend reports them: the radix sort orders float32 bits, and snapped thresholds are
        # float32 values, so a wider dtype could order near-equal values wrongly.
        confidence = np.asarray(confidence, dtype=np.float32)
        self.ramps, self.n = confidence.shape
        self.confidence = confidence
        self.correct = np.asarray(prediction) == np.asarray(final)[None, :]
        self.exit_ms = np.asarray(exit_ms, dtype=float)
        # Confidences of 1.0 exit only below NEVER_EXIT: at TIGHTEST_OPEN they tie with the highest float32 below it.
        # NaN (a malformed input's) clears no threshold, nor does -1, which sorts it below every threshold (>= 0).
        confidence = np.where(confidence >= 0, np.minimum(confidence, np.float32(TIGHTEST_OPEN)), np.float32(-1))
        order = descending_order(confidence)  # order among equal confidences is irrelevant: ties move together
        self._order = order.ravel()
        self._descending = np.take_along_axis(confidence, order, axis=1).astype(float).ravel()
        self._base = np.arange(self.ramps) * self.n
        # _position[r, s]: where sample s sits in ramp r's confidence order (flat).
        position = np.empty(self.ramps * self.n, dtype=np.intp)
        position[self._order + self._base.repeat(self.n)] = np.arange(self.ramps * self.n)
        self._position = position.reshape(self.ramps, self.n)
        # Ascending keys 2r - confidence, so one searchsorted gives every ramp's first position below its threshold.
        self._offset = 2.0 * np.arange(self.ramps)
        self._keys = self._offset.repeat(self.n) - self._descending
        # Per exit position (ramps, then the final layer, which always agrees): whether its answer agrees.
        self._agree_table = np.append(self.correct, np.ones((1, self.n), dtype=bool), axis=0).astype(np.int64)

    def starts(self, thresholds: np.ndarray) -> np.ndarray:
        """Position of each ramp's first sample that does not clear its threshold (all of them for ``NEVER_EXIT``)."""
        cleared = np.searchsorted(self._keys, self._offset - thresholds, side="right")
        return np.where(thresholds < NEVER_EXIT, cleared, self._base)

    def run(self, thresholds: np.ndarray, step: float, settings: TunerSettings) -> tuple[np.ndarray, float] | None:
        """Climb from ``thresholds`` within ``settings.guard``; returns the final thresholds and their mean saving
        (ms per sample), or ``None`` when the guard does not admit ``thresholds`` themselves on this window: every
        step of a climb stays admitted, so such a start is no configuration to refine (the tuner then keeps the climb
        from "no exits")."""
        n, ramps = self.n, self.ramps
        thresholds = np.array(thresholds, dtype=float)
        start = self.starts(thresholds)
        closed = bool((thresholds >= NEVER_EXIT).all())
        first = np.full(n, ramps) if closed else first_exit(self.confidence, thresholds)
        table, position, ramp_ms = self._agree_table, self._position, self.exit_ms[:-1]
        agree_now = table[first, np.arange(n)]
        hits = int(agree_now.sum())
        latency = float(self.exit_ms[first].sum())
        min_hits, min_step = settings.guard.min_agreeing(n), settings.min_step
        if hits < min_hits:
            return None
        # What moving each sample to each ramp gains, plus one trailing zero so that a band ending at the last
        # position still has an end index for reduceat.
        live = first > np.arange(ramps)[:, None]
        gain_hits = np.zeros(ramps * n + 1, dtype=np.int64)
        gain_ms = np.zeros(ramps * n + 1)
        gain_hits[position] = live * (table[:-1] - agree_now)
        gain_ms[position] = live * (ramp_ms[:, None] - self.exit_ms[first])
        steps = np.full(ramps, step)
        bounds = np.empty(2 * ramps, dtype=np.intp)
        last = self._base + n - 1
        for _ in range(settings.max_rounds):
            if steps.max() < min_step:
                break
            # Lower each threshold by its step, and at least to the next confidence so that plateaus are crossed.
            target = np.minimum(thresholds - steps, self._descending[np.minimum(start, last)])
            new_start = np.searchsorted(self._keys, self._offset - np.maximum(target, 0.0), side="right")
            bounds[0::2] = start
            bounds[1::2] = new_start
            # reduceat sums [bounds[i], bounds[i + 1]); it yields an empty band's first element, hence `width > 0`.
            band_hits = np.add.reduceat(gain_hits, bounds)[0::2].tolist()
            band_ms = np.add.reduceat(gain_ms, bounds)[0::2].tolist()
            chosen, best_cost, best_ms = -1, 0.0, 0.0
            for ramp, (width, delta_hits, delta_ms) in enumerate(zip((new_start - start).tolist(), band_hits, band_ms)):
                if width <= 0 or delta_ms >= -1e-12 or hits + delta_hits < min_hits:
                    continue
                # Least accuracy lost per millisecond saved; among equals (e.g. free moves) the largest saving.
                cost = max(-delta_hits, 0) / -delta_ms
                if chosen < 0 or cost < best_cost or (cost == best_cost and delta_ms < best_ms):
                    chosen, best_cost, best_ms = ramp, cost, delta_ms
            if chosen < 0:
                steps *= 0.5
                continue
            band = self._order[start[chosen]:new_start[chosen]]
            moved = band[first[band] > chosen]
            first[moved] = chosen
            hits += band_hits[chosen]
            latency += best_ms
            # The moved samples now exit at `chosen`: nothing to gain at it or deeper; shallower ramps gain against it.
            rows = position[:, moved]
            gain_hits[rows[chosen:]] = 0
            gain_ms[rows[chosen:]] = 0.0
            gain_hits[rows[:chosen]] = table[:chosen, moved] - table[chosen, moved]
            gain_ms[rows[:chosen]] = (ramp_ms[:chosen] - self.exit_ms[chosen])[:, None]
            # Snap up to the lowest confidence that clears: same exits, the tightest threshold that gives them.
            start[chosen] = new_start[chosen]
            thresholds[chosen] = self._descending[start[chosen] - 1]
            steps[chosen] *= 2.0
        return thresholds, float(self.exit_ms[-1] - latency / max(n, 1))


class ThresholdTuner:
    """Tunes the thresholds of a fixed active ramp set on a window of feedback.

    Args:
        settings: guard and search parameters.
    """

    def __init__(self, settings: TunerSettings | None = None) -> None:
        self.settings = settings or TunerSettings()

    def tune(
        self,
        confidence: np.ndarray,
        prediction: np.ndarray,
        final: np.ndarray,
        exit_ms: np.ndarray,
        current: np.ndarray | None = None,
    ) -> np.ndarray:
        """Best thresholds ``[R]`` for the window; all ``NEVER_EXIT`` when no exit is affordable.

        Args:
            confidence: ``[R, N]`` confidences of the active ramps (depth order).
            prediction: ``[R, N]`` their predictions.
            final: ``[N]`` the original model's predictions.
            exit_ms: ``[R + 1]`` latency of answering at each active ramp and at the final layer
                (``LatencyModel.exit_latencies``).
            current: thresholds in use; when the guard admits them on this window, a climb also starts from them.
        """
        confidence = np.asarray(confidence, dtype=np.float32)
        if confidence.size == 0:
            return np.full(confidence.shape[0], NEVER_EXIT)
        return self._tune(_Climb(confidence, prediction, final, exit_ms), current)

    def _tune(self, climb: _Climb, current: np.ndarray | None) -> np.ndarray:
        """``tune`` on a window already sorted into ``climb`` (which several tunings of one window share)."""
        s = self.settings
        best = never = np.full(climb.ramps, NEVER_EXIT)
        best_saving = 0.0
        for step in s.initial_steps:
            climbed = climb.run(never, step, s)
            if climbed is not None and climbed[1] > best_saving + 1e-12:
                best, best_saving = climbed
        if current is not None:
            climbed = climb.run(np.clip(np.asarray(current, dtype=float), 0.0, NEVER_EXIT), min(s.initial_steps), s)
            if climbed is not None and climbed[1] + s.churn_ms >= best_saving:
                best = climbed[0]
        return best


#: Times the budget a choice is tuned to halves when the held-out samples reject it. Halving, not subtracting the gap
#: between the two parts: on windows of a few hundred samples that gap is mostly noise and often exceeds the budget,
#: and tuning to a zero budget closes every exit (measured on MiniLM: held-out agreement of the halved choices rose
#: 0.984 -> 0.991 -> 0.994 where subtracting the gap closed everything).
TIGHTENINGS = 5

#: The paper's back-off: each open ramp's ``1 - threshold`` scaled by these factors in turn.
BACK_OFF_FACTORS = (0.5, 0.25, 0.1, 0.05, 0.02)


def back_off(thresholds: np.ndarray, confidence: np.ndarray, correct: np.ndarray, exit_ms: np.ndarray,
             enough: Callable[[float], bool]) -> np.ndarray:
    """The least tightening of ``thresholds`` (each open ramp's ``1 - t`` scaled by ``BACK_OFF_FACTORS`` in turn)
    whose agreement on ``confidence`` / ``correct`` ``[R, N]`` is ``enough``; every ramp closed when none is."""
    for factor in BACK_OFF_FACTORS:
        scaled = np.where(thresholds < NEVER_EXIT, 1.0 - (1.0 - thresholds) * factor, NEVER_EXIT)
        if enough(evaluate(scaled, confidence, correct, exit_ms).accuracy):
            return scaled
    return np.full(len(thresholds), NEVER_EXIT)


def is_held_out(positions: np.ndarray) -> np.ndarray:
    """The samples ``tune_held_out`` judges on, by their positions in the stream (or split): every odd one. Fixed per
    position, so a sample that stays in a sliding window never changes sides, and interleaved, so both sides cover
    the same period of traffic."""
    return np.asarray(positions) % 2 == 1


def tune_held_out(
    settings: TunerSettings,
    confidence: np.ndarray,
    prediction: np.ndarray,
    final: np.ndarray,
    exit_ms: np.ndarray,
    held_out: np.ndarray,
    current: np.ndarray | None = None,
) -> np.ndarray | None:
    """Thresholds chosen on the samples outside ``held_out`` (a ``[N]`` mask) that ``settings.guard`` also admits on
    the held-out ones, tuning to half the budget each time they do not (at most ``TIGHTENINGS`` times); ``None`` when
    no choice passes. When the halvings end in a choice that opens nothing (which always passes) and no thresholds in
    use exit (``current`` is ``None`` or all ``NEVER_EXIT``), the last rejected choice that exits backs off
    (``back_off``) until the held-out samples admit it, if a back-off that still exits does.

    Why: thresholds chosen on a set of samples are judged optimistically on that same set, where the climb stopped
    exactly at the guard's edge; the held-out samples say what they will serve. The controller splits its window this
    way every round, ``prepare`` and the E3 planner their validation splits (``is_held_out``). Why the back-off:
    halving the budget cannot undo the climb's free moves, which lower every threshold to just above the first sample
    it gets wrong on the chosen half; measured on the test suite's ResNet-20 with 9 ramps and no exits open
    (2,000-sample window), the choices at every halving exited ~43 % of the held-out half with 7 disagreements (6
    admitted), so the halvings ended in no exits round after round, and exits opened only when the window happened to
    split luckily. Only from no exits: where thresholds in use exit, the caller keeps them (or backs them off on a
    breach) rather than take a certified but much tighter back-off.
    """
    held_out = np.asarray(held_out, dtype=bool)
    picked = ~held_out
    confidence = np.asarray(confidence, dtype=np.float32)
    correct = np.asarray(prediction)[:, held_out] == np.asarray(final)[None, held_out]
    count = int(held_out.sum())
    chosen_on = confidence[:, picked]
    climb = _Climb(chosen_on, prediction[:, picked], final[picked], exit_ms) if chosen_on.size else None

    def admitted(accuracy: float) -> bool:
        return bool(settings.guard.admits(round(accuracy * count), count))

    opening = current is None or bool((np.asarray(current) >= NEVER_EXIT).all())
    guard, rejected = settings.guard, None
    for _ in range(TIGHTENINGS):
        tuner = ThresholdTuner(replace(settings, guard=guard))
        thresholds = np.full(len(confidence), NEVER_EXIT) if climb is None else tuner._tune(climb, current)
        exits = bool((thresholds < NEVER_EXIT).any())
        if admitted(evaluate(thresholds, confidence[:, held_out], correct, exit_ms).accuracy):
            if exits or rejected is None or not opening:
                return thresholds
            backed = back_off(rejected, confidence[:, held_out], correct, exit_ms, admitted)
            return backed if any_exit(confidence, backed) else thresholds
        rejected = thresholds if exits else rejected
        guard = replace(guard, budget=guard.budget / 2)
    return None
