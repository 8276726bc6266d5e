"""One model's control decisions: tune its thresholds on its feedback window and judge its ramp set on measured
latency. ``controller.service`` feeds it records and publishes what it proposes.

Each round (``min_fresh`` new samples) re-tunes thresholds from the ones in use: they are chosen on one half of the
window (interleaved, so both halves cover the same period) and published only if the other half confirms the
budget. Every ``adjust_every`` rounds the *measured* saving of the active ramp set is checked (the smaller of the
mean request's and the median request's, ``MeasuredExits.saving_ms``): a set that measurably does not save latency
at the current load (its saving below zero by more than the guard's ``z`` standard errors) is switched off (the
model then runs its fused vanilla graph) and probed again later with exponential back-off; a ramp-set change proposed
by the adjuster is an experiment, kept only if its measured saving beats the set it replaced, else rolled back.
"""

from __future__ import annotations

import copy
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from controller.adjuster import AdjusterSettings, RampAdjuster
from controller.baseline import FusedBaseline
from controller.e3_resizer import ResizerSettings
from controller.guard import AccuracyGuard
from controller.latency import LatencyModel, MeasuredExits, measured_exits
from controller.tuner import TunerSettings, back_off, evaluate, is_held_out, tune_held_out
from controller.window import FeedbackWindow, WindowView
from early_exit.exit_config import ExitConfig
from early_exit.exit_rule import NEVER_EXIT, TIGHTEST_OPEN, any_exit
from early_exit.feedback import FeedbackRecord
from early_exit.manifest import Manifest

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerSettings:
    """Args:
    tuner: accuracy guard and search parameters.
    window: samples kept per model: thresholds are tuned on all of them while its two halves agree alike under them,
        else on the newer half.
    min_fresh: new samples required before thresholds may change again (never loosen on stale evidence).
    min_change: smallest threshold change worth publishing.
    adjust_every: judge the active ramp set on measured latency every this many tuning rounds (0: never).
    adjuster: overhead budget and ramp count bound for ramp adjustment.
    probe_after: seconds exits stay off after they stopped paying before the last set is tried again (doubles
        after every failed probe, up to ``max_probe_after``).
    max_probe_after: upper bound of the probe back-off.
    resizer: when an E3 entry's block models are re-sized for the exit rates observed (``controller.e3_resizer``).
    """

    tuner: TunerSettings = TunerSettings()
    window: int = 4000
    min_fresh: int = 256
    min_change: float = 0.002
    adjust_every: int = 3
    adjuster: AdjusterSettings = AdjusterSettings()
    probe_after: float = 30.0
    max_probe_after: float = 600.0
    resizer: ResizerSettings = ResizerSettings()

    def __post_init__(self) -> None:
        if self.min_fresh <= 0 or self.min_fresh > self.window:
            raise ValueError(f"min_fresh must be in [1, window={self.window}], got {self.min_fresh}")
        if self.adjust_every < 0:
            raise ValueError(f"adjust_every must be >= 0, got {self.adjust_every}")
        if not 0 < self.probe_after <= self.max_probe_after:
            raise ValueError(f"probe_after must be in (0, max_probe_after={self.max_probe_after}]")


#: Standard errors by which a window's newer half must agree less than its older half, under the thresholds tuned on
#: both, before the older half is taken for traffic of another kind and dropped (``ModelController._tune_stationary``).
DRIFT_Z = 2.0


@dataclass(frozen=True)
class Trial:
    """A ramp-set change under evaluation: what it replaced and the measured saving it has to beat."""

    previous: dict[int, float]
    baseline_ms: float


@dataclass(frozen=True)
class _RoundState:
    """What a tuning round may change on the way to proposing a configuration, kept to undo it if that
    configuration is never written."""

    fresh: int
    rounds: int
    judge_from: int
    trial: Trial | None
    parked: dict[int, float]
    parked_cost: MeasuredExits | None
    off_until: float
    probe_after: float
    last_open: dict[int, float]
    adjuster: RampAdjuster  # a copy: it remembers which candidate ramps it tried


class ModelController:
    """Tunes one model's thresholds and judges its ramp set from its feedback window.

    Args:
        manifest: the model's manifest (profile, candidate ramps).
        current: the configuration in use.
        settings: control settings.
        clock: monotonic time source (tests drive it).
    """

    def __init__(self, manifest: Manifest, current: ExitConfig, settings: ControllerSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.manifest = manifest
        self.settings = settings
        self.window = FeedbackWindow(settings.window)
        self.baseline = FusedBaseline()  # the fused graph's batch times: what exits are measured against
        self.adjuster = RampAdjuster(len(manifest.ramps), settings.adjuster)
        self.clock = clock
        self.rounds = 0
        self.breach_checked = 0  # fresh samples in the window at the last breach check
        self.current = current
        self.last_open = dict(manifest.initial_thresholds)  # the last thresholds that let something exit
        self.adopt(current)

    @property
    def guard(self) -> AccuracyGuard:
        return self.settings.tuner.guard

    def adopt(self, config: ExitConfig) -> None:
        """Take ``config`` as the one in use (ours, or written by someone else) and restart the experiment state."""
        self.current = config
        self.judge_from = config.version  # measured savings count samples served from this version on
        self._uncommitted: _RoundState | None = None  # what the last round changed for a proposal not yet written
        self.trial: Trial | None = None
        self.parked: dict[int, float] = {}  # the set switched off for not paying, probed again later
        self.parked_cost: MeasuredExits | None = None  # what its exits measured when they were switched off
        self.off_until = 0.0
        self.probe_after = self.settings.probe_after
        if any(t < NEVER_EXIT for t in config.thresholds.values()):
            self.last_open = dict(config.thresholds)

    def observe(self, record: FeedbackRecord) -> None:
        self.baseline.add(record)  # a fused-graph batch, whenever served, is the baseline of measured savings
        if not record.ramps and self.current.active_ramps:
            return  # a control batch, served on the fused graph while exits are on: the baseline's only
        if record.config_version < self.current.version and record.ramps != self.current.active_ramps:
            return  # from before a ramp-set change: cannot inform the current ramps
        # Answers served under an older configuration inform the tuning but are no evidence about the one in use: a
        # controller reading a backlog (e.g. started after the backends served for a while) would otherwise tune
        # round after round on it, publishing configurations that serve nothing (measured in `make bench`: four
        # within 1.3 s).
        self.window.add(record, fresh=record.config_version >= self.current.version)

    def step(self) -> ExitConfig | None:
        """A new configuration when fresh feedback justifies one, else ``None``.

        What a round decides for a configuration it proposes (its evidence used up, a trial or probe under way, exits
        switched off) takes effect only once ``committed`` says the configuration was written: when it was not (the
        write failed, or another writer's newer configuration won), the round is undone here and decided again.
        """
        if self._uncommitted is not None:
            self._restore(self._uncommitted)
        before = self._round_state()
        config = self._decide()
        self._uncommitted = before if config is not None else None
        return config

    def _round_state(self) -> _RoundState:
        return _RoundState(self.window.fresh, self.rounds, self.judge_from, self.trial, self.parked, self.parked_cost,
                           self.off_until, self.probe_after, self.last_open, copy.deepcopy(self.adjuster))

    def _restore(self, state: _RoundState) -> None:
        # Samples observed since the undone round stay fresh too; none beyond what the window still holds.
        self.window.fresh = min(state.fresh + self.window.fresh, len(self.window))
        self.rounds = state.rounds
        self.judge_from = state.judge_from
        self.trial = state.trial
        self.parked = state.parked
        self.parked_cost = state.parked_cost
        self.off_until = state.off_until
        self.probe_after = state.probe_after
        self.last_open = state.last_open
        self.adjuster = state.adjuster
        self._uncommitted = None

    def _decide(self) -> ExitConfig | None:
        if not self.current.active_ramps:
            if not self.parked or self.clock() < self.off_until:
                return None
            return self._probe() if self._load_allows_probe() else None
        quarter, fresh = self.settings.min_fresh // 4, self.window.fresh
        if self.window.ramps != self.current.active_ramps or fresh < quarter:
            return None  # cheap exit on most polls: a breach is judged on a quarter of a round at the earliest
        if fresh < self.settings.min_fresh and self.breach_checked <= fresh < self.breach_checked + quarter:
            # Before a round is due, a breach is checked once per quarter round of fresh samples: the window's view
            # on every record cost ~2.7 ms of CPU per record on ResNet-56's 27 candidate ramps at batch 1.
            return None
        self.breach_checked = fresh
        view = self.window.view()
        served, count = view.realised_accuracy(since_version=self.current.version)
        breached = self.guard.breached(round(served * count), count)
        if self.window.fresh < (self.settings.min_fresh // 4 if breached else self.settings.min_fresh):
            return None
        self.window.fresh = 0
        self.rounds += 1
        latency = LatencyModel.from_manifest(self.manifest, view.mean_batch_size)
        exit_ms = latency.exit_latencies(view.ramps)
        thresholds, view = self._tune_stationary(view, exit_ms)
        proposal = None
        # The ramp set is judged every few rounds, and only while accuracy is in hand: after a breach the thresholds
        # must settle first. A probe (exits back on after being switched off) is judged as soon as it is measured.
        due = self.rounds % max(self.settings.adjust_every, 1) == 0 or (self.trial is not None and
                                                                        not self.trial.previous)
        # An E3 deployment's exits are its block boundaries: only a new plan moves them. A round whose tuning closes
        # every open exit (no sample of the window would exit) is about accuracy, not about the set: utilities under
        # closed thresholds are all zero, and a trial started from them, or its rollback, would publish closed ones.
        closing = thresholds is not None and not any_exit(view.confidence, thresholds)
        closing &= any(t < NEVER_EXIT for t in self.current.thresholds.values())
        measured = measured_exits(view, self.judge_from, self.baseline)
        if self.settings.adjust_every and due and not breached and not closing and not self.manifest.exits_fixed:
            proposal = self._judge_ramp_set(view, thresholds, latency, measured)
        summary = (f"window {view.size}, served agreement {served:.4f} ({count} answers under "
                   f"v{self.current.version}), measured saving {measured.saving_ms():.2f} ms (mean "
                   f"{measured.mean_saving_ms():.2f} ms, standard error {measured.se_ms:.2f} ms; {measured.count} "
                   f"samples, busy {view.busy:.0%})")
        if proposal is None:
            old = self._in_use(view)
            if thresholds is None or np.abs(thresholds - old).max(initial=0.0) < self.settings.min_change:
                # The first tuning on a new set kept its thresholds: from now on, judge the set as it is.
                self.judge_from = min(self.judge_from, self.current.version)
                LOGGER.info("%s: keeping v%d; %s", self.manifest.name, self.current.version, summary)
                return None
            proposal = {r: float(t) for r, t in zip(view.ramps, thresholds)}
        evaluation = evaluate(np.asarray([proposal.get(r, NEVER_EXIT) for r in view.ramps]), view.confidence,
                              view.prediction == view.final, exit_ms)
        config = self._publishable(proposal)
        LOGGER.info("%s v%d: %s; expected agreement %.4f, modelled saving %.2f ms; thresholds %s", self.manifest.name,
                    config.version, summary, evaluation.accuracy, evaluation.saving_ms, config.thresholds)
        return config

    def committed(self, config: ExitConfig) -> None:
        """``config`` was written to Redis: it is now the one in use, and the measured saving of its ramp set is
        judged on the answers it serves (for a set with ramps that only observe so far, on those served after their
        first tuning)."""
        untuned = False
        if config.active_ramps != self.current.active_ramps:
            self.window.clear()
            untuned = any(t >= NEVER_EXIT for t in config.thresholds.values())
        self.judge_from = config.version + untuned
        if any(t < NEVER_EXIT for t in config.thresholds.values()):
            self.last_open = dict(config.thresholds)
        self.current = config
        self._uncommitted = None

    def _publishable(self, thresholds: dict[int, float]) -> ExitConfig:
        return ExitConfig(self.manifest.name, self.current.version + 1, thresholds,
                          writer=f"controller@{socket.gethostname()}")

    def _tune_stationary(self, view: WindowView, exit_ms: np.ndarray) -> tuple[np.ndarray | None, WindowView]:
        """``_tune`` on the whole window, unless its older samples were traffic of another kind: then on the newer
        half only, which the window keeps from then on. Returns the thresholds (``None``: keep those in use) and the
        samples they were tuned on.

        Why a window of two halves: the guard certifies thresholds on the samples they were not chosen on, and the
        fewer those are, the more agreement it must keep in hand. Tuned on 2,000 of ResNet-56's validation inputs and
        judged on the other 3,000, the thresholds served 99.53 % agreement with a modelled median saving of 21.2 %; on
        4,000, 99.52 % and 24.1 % (24 random splits each). A longer window, though, remembers traffic that has
        changed. So the thresholds tuned on all of it (or those in use, when it keeps them) must agree on its newer
        half as they do on its older half: when the newer half agrees less by more than ``DRIFT_Z`` standard errors,
        the older half is dropped and the tuning repeated on the newer one, a window as long as it was before it had
        two halves.
        """
        thresholds = self._tune(view, exit_ms)
        newer = view.newest(self.settings.window // 2)
        if newer.size == view.size:
            return thresholds, view
        older = view.subset(np.arange(view.size - newer.size))
        judged = self._in_use(view) if thresholds is None else thresholds
        agree_old, agree_new = self._agreement(judged, older, exit_ms), self._agreement(judged, newer, exit_ms)
        pooled = (agree_old * older.size + agree_new * newer.size) / view.size
        error = np.sqrt(pooled * (1.0 - pooled) * (1.0 / older.size + 1.0 / newer.size))
        if agree_old - agree_new <= DRIFT_Z * error:
            return thresholds, view
        LOGGER.info("%s: traffic changed: the window's newer %d samples agree %.4f under its thresholds, its older %d "
                    "%.4f; tuning on the newer ones", self.manifest.name, newer.size, agree_new, older.size, agree_old)
        self.window.keep_latest(newer.size)
        return self._tune(newer, exit_ms), newer

    def _tune(self, view: WindowView, exit_ms: np.ndarray) -> np.ndarray | None:
        """New thresholds, or ``None`` to keep the ones in use.

        Candidates are chosen on half the window (climbing from the thresholds in use) and the guard must admit them
        on the other half too: its lower bound, not the point estimate, because every round tests its candidates on
        much the same held-out samples, and a point estimate would sooner or later pass one by luck (measured: 1-1.5
        points less agreement served than expected on ResNet-20). The halves are fixed per sample (by its position in
        the stream), so no round ever chooses thresholds on a sample that later rounds hold out. Thresholds in use that
        fall short of the budget on the held-out half back off (the paper's scaling of ``1 - threshold``) just until the
        held-out half reaches it, as long as something still exits; so do thresholds whose own answers (a round's worth,
        served since they were published) fall short, though the window's older samples meet the budget (measured on
        MiniLM: tuned on an easier stretch of traffic, thresholds served 98.6 % on the next 1,657 answers, kept until
        those alone clearly breached it). On a clear breach of the whole window the thresholds in use first back off as
        the paper does (each ramp's ``1 - threshold`` scaled down until the guard admits them) and the climb starts from
        there; when it certifies nothing that exits (a window of a few hundred samples rarely can), they back off just
        until the window's answers meet the budget, and every exit closes only when no back-off does, so small or noisy
        windows never close exits that work.
        """
        choose = ~is_held_out(view.sequence)
        held_out = view.subset(np.flatnonzero(~choose))
        current = self._in_use(view)
        correct = view.prediction == view.final
        now = evaluate(current, view.confidence, correct, exit_ms)
        failing = self.guard.breached(round(now.accuracy * view.size), view.size)
        if not self.guard.decidable(int(choose.sum())):
            # Too few samples to certify anything, but not too few to show a breach: a probe of exits parked before
            # the traffic changed served 95.3 % agreement for 323 answers of ResNet-56's drift phase while its new
            # window stayed below what the guard can certify.
            return self._tightened(current, view, view, exit_ms) if failing else None
        served = view.subset(np.flatnonzero(view.version >= self.current.version))
        shortfall = None  # the samples the thresholds in use fall short on, if any: their own answers first
        if served.size >= self.settings.min_fresh and self._agreement(current, served, exit_ms) < self.guard.floor:
            shortfall = served
        elif self._agreement(current, held_out, exit_ms) < self.guard.floor:
            shortfall = held_out
        start = self._back_off(current, view, exit_ms, self._admitted_on(view)) if failing else current
        thresholds = tune_held_out(self.settings.tuner, view.confidence, view.prediction, view.final, exit_ms,
                                   ~choose, start)
        if thresholds is not None:
            if failing and any_exit(view.confidence, thresholds):
                return thresholds  # a breach takes any certified tuning that still exits
            if not failing and evaluate(thresholds, view.confidence, correct, exit_ms).saving_ms >= now.saving_ms \
                    and (shortfall is None or self._agreement(thresholds, shortfall, exit_ms) >= self.guard.floor):
                return thresholds  # else admitted, but saves less than what is in use, or repeats the shortfall
        if failing or shortfall is not None:
            # Tightening to the point estimate, never closing every exit on a window too small to certify anything:
            # the thresholds in use back off just until the samples that showed the problem (the whole window on a
            # breach, the answers or the held-out half that fell short) would have met the budget; every exit closes
            # only when no back-off does. Re-tuning on the other half instead (to the guard's lower bound on a few
            # hundred samples, each halving of the budget tighter) picked candidates that exit almost nothing
            # (measured on MiniLM: a window serving 99.2 % tightened to no exits, which then measured as a loss and
            # switched exits off); in E3 mode, whose window fills with 5 % of the answers, 6 disagreements among 387
            # samples closed the only exit although it served 99.2 % over the whole benchmark, and E3's goodput
            # collapsed.
            return self._tightened(current, view, view if failing or shortfall is None else shortfall, exit_ms,
                                   close=failing)
        return None

    def _tightened(self, current: np.ndarray, view: WindowView, samples: WindowView, exit_ms: np.ndarray,
                   close: bool = True) -> np.ndarray | None:
        """``current`` backed off just until ``samples`` (of ``view``) would have met the budget; when no back-off
        that still exits on ``view`` does, every exit closed (``close``) or ``None`` (keep what is in use)."""
        tightened = self._back_off(current, samples, exit_ms, lambda accuracy: accuracy >= self.guard.floor)
        if any_exit(view.confidence, tightened):
            return _snapped(tightened, view.confidence)
        return np.full(len(current), NEVER_EXIT) if close else None

    def _in_use(self, view: WindowView) -> np.ndarray:
        """The thresholds in use, in the order of ``view``'s ramps."""
        return np.asarray([self.current.thresholds[r] for r in view.ramps])

    @staticmethod
    def _agreement(thresholds: np.ndarray, samples: WindowView, exit_ms: np.ndarray) -> float:
        return evaluate(thresholds, samples.confidence, samples.prediction == samples.final, exit_ms).accuracy

    def _admitted_on(self, view: WindowView) -> Callable[[float], bool]:
        return lambda accuracy: bool(self.guard.admits(round(accuracy * view.size), view.size))

    @staticmethod
    def _back_off(current: np.ndarray, view: WindowView, exit_ms: np.ndarray,
                  enough: Callable[[float], bool]) -> np.ndarray:
        return back_off(current, view.confidence, view.prediction == view.final, exit_ms, enough)

    def _judge_ramp_set(self, view: WindowView, thresholds: np.ndarray | None, latency: LatencyModel,
                        measured: MeasuredExits) -> dict[int, float] | None:
        """A new ramp set (as thresholds) when ``measured`` (the set's exits since ``judge_from``) says so, else
        ``None``."""
        saving = measured.saving_ms()
        if measured.count < self.settings.min_fresh:
            return None
        tuned = dict(self.current.thresholds) if thresholds is None else \
            {r: float(t) for r, t in zip(view.ramps, thresholds)}
        if all(t >= NEVER_EXIT for t in self.current.thresholds.values()):
            # Nothing could exit under the thresholds in use, so there is no saving to judge: let the tuner open
            # exits first; if it cannot either on a full window, these ramps are pure cost. (A smaller window
            # certifies less: on MiniLM nothing opened below ~2,000 samples that a full window opened.)
            closed = all(t >= NEVER_EXIT for t in tuned.values()) and view.size >= self.settings.window
            return self._switch_off(tuned, "no exit is affordable within the accuracy budget") if closed else None
        z = self.guard.z
        if self.trial is not None:
            trial, self.trial = self.trial, None
            # A probe (exits back on) has to beat no exits, as the switch-off judged them: on evidence; another set
            # has to beat the one it replaced.
            kept = measured.may_pay(z) if not trial.previous else saving > trial.baseline_ms
            LOGGER.info("%s: ramps %s %s: measured saving %.2f ms (standard error %.2f ms) against %.2f ms",
                        self.manifest.name, view.ramps, "kept" if kept else f"rolled back to {sorted(trial.previous)}",
                        saving, measured.se_ms, trial.baseline_ms)
            if kept:
                self.probe_after = self.settings.probe_after
                return None
            if not trial.previous:
                return self._switch_off(tuned, "the probe did not pay either", measured)
            return dict(trial.previous)
        if not measured.may_pay(z):
            return self._switch_off(tuned, f"early exits do not pay at the current load ({saving:.2f} ms measured, "
                                           f"standard error {measured.se_ms:.2f} ms)", measured)
        active = self.adjuster.propose(view.ramps, np.asarray([tuned[r] for r in view.ramps]), view.confidence,
                                       latency)
        if active is None:
            return None
        LOGGER.info("%s: trying ramps %s instead of %s (measured saving %.2f ms to beat)", self.manifest.name,
                    active, view.ramps, saving)
        self.trial = Trial(dict(tuned), saving)
        return {r: tuned.get(r, NEVER_EXIT) for r in active}

    def _switch_off(self, tuned: dict[int, float], reason: str, measured: MeasuredExits | None = None
                    ) -> dict[int, float]:
        """Exits do not pay: serve the fused vanilla graph, and probe ``tuned`` (or, when it opens no exit, the last
        configuration that did) again later. ``measured``: what the exits cost and saved, when they did not pay at
        the load of the time (``None`` when they could not open at all)."""
        self.parked = tuned if any(t < NEVER_EXIT for t in tuned.values()) else dict(self.last_open)
        self.parked_cost = measured
        LOGGER.info("%s: exits off for %.0f s: %s", self.manifest.name, self._postpone_probe(), reason)
        return {}

    def _postpone_probe(self) -> float:
        """Schedule the next probe ``probe_after`` seconds from now and double the delay for the one after (up to
        ``max_probe_after``); returns the delay scheduled."""
        delay = self.probe_after
        self.off_until = self.clock() + delay
        self.probe_after = min(2 * delay, self.settings.max_probe_after)
        return delay

    def _load_allows_probe(self) -> bool:
        """Whether the parked exits could pay at the load measured since they were switched off.

        Exits that did not pay for their work at one utilisation will not at the same or a higher one: the queueing
        their work causes grows with it (``MeasuredExits.saving_ms``), and a probe there only repeats the loss, with
        queues that outlast it on a busy server (measured on ResNet-56 at 80-85 % busy: probes every 30-60 s cost the
        adaptive entry ~10 points of median). So the parts measured before the switch-off are priced at the
        utilisation the backends report with every exit off, and the probe is skipped, backing off as a failed one
        does, while they predict no saving. With no measurement (the exits never opened) or too little feedback since
        (little traffic), the probe goes ahead. Only the mean part is priced (``MeasuredExits.mean_saving_ms``): the
        median request's saving depends on the share of inputs that exit, which only a probe can measure again
        (traffic may have changed while the exits were off); the probe is judged on both. As when they were switched
        off, the prediction must show a loss beyond its standard error (``MeasuredExits.may_pay``). And it holds only
        for batches of about the size it was measured on (at least half of it): a full batch holds its early answers
        to its end (the backend), so an in-batch loss measured in a saturated spell says nothing about batches of one
        or two; once the batches are that much smaller, the probe goes ahead.
        """
        view = self.window.view()
        if self.parked_cost is None or self.window.ramps != () or view.size < self.settings.min_fresh:
            return True
        if view.batch_size.mean() < self.parked_cost.batch_size / 2:
            return True
        if self.parked_cost.may_pay(self.guard.z, view.busy, mean_only=True):
            return True
        predicted = self.parked_cost.mean_saving_ms(view.busy)
        LOGGER.info("%s: not probing ramps %s for %.0f s: at %.0f%% busy their measured work predicts %.2f ms "
                    "(%.0f%% when switched off)", self.manifest.name, sorted(self.parked), self._postpone_probe(),
                    100 * view.busy, predicted, 100 * self.parked_cost.busy)
        return False

    def _probe(self) -> ExitConfig:
        """Try the parked set again; it has to beat no exits at all (a measured saving above 0)."""
        thresholds, self.parked = self.parked, {}
        self.trial = Trial({}, 0.0)
        LOGGER.info("%s: probing ramps %s again", self.manifest.name, sorted(thresholds))
        return self._publishable(thresholds)


def _snapped(thresholds: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Each open threshold raised to the lowest confidence in the window that clears it: the same exits on the
    window, and never looser than needed for them (the tuner's thresholds are chosen the same way)."""
    snapped = np.array(thresholds, dtype=float)
    for r, threshold in enumerate(snapped):
        clearing = confidence[r][confidence[r] >= threshold]
        if threshold < NEVER_EXIT and clearing.size:
            snapped[r] = min(float(clearing.min()), TIGHTEST_OPEN)
    return snapped
