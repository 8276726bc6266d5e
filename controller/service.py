"""The online control loop: consume feedback, tune thresholds per model, publish new configurations.

One ``ModelController`` per served model holds its window and its current configuration; ``ControllerService``
discovers models from Redis, reads every feedback stream through one consumer group (so a restarted or replicated
controller resumes instead of re-reading) and steps each model controller. Redis outages are waited out: the backends
keep serving on their last configuration meanwhile.

Each round (``min_fresh`` new samples) re-tunes thresholds from the ones in use: they are chosen on one half of the
window (interleaved, so both halves cover the same period) and published only if the other half confirms the
budget. Every ``adjust_every`` rounds the *measured* saving of the active ramp set is checked (the smaller of the
mean request's and the median request's, ``MeasuredExits.saving_ms``): a set that does not save latency at the
current load is switched off (the model then runs its fused vanilla graph) and probed again later with exponential
back-off; a ramp-set change proposed by the adjuster is an experiment, kept only if its measured saving beats the set
it replaced, else rolled back.

Several controllers may run at once (a stand-by, a rolling update): a lease in Redis (``controller.lease``) makes one
of them active, and only that one reads feedback, tunes and publishes, every write fenced by the lease. The others
stand by and take the lease when it lapses. A controller that takes over starts from what Redis holds (the stored
configurations) and first claims every entry the consumer group delivered but nobody acknowledged: its old holder
read them and died (or is fenced) before acknowledging, so no feedback is lost with it.

Many Triton replicas serve one model under one configuration: their feedback shares the model's stream, each record
naming its replica. The active controller logs each replica the first time it sees its feedback and, about once a
second, writes a small status document per model (``RedisKeys.status``: holder, configuration version, window size,
samples per replica, time written), so an operator sees whose feedback the thresholds are tuned on.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis

from controller.adjuster import AdjusterSettings, RampAdjuster
from controller.baseline import FusedBaseline
from controller.config_store import publish_config, publish_plan, read_config, read_plan
from controller.e3_resizer import ResizerSettings, resize_plan
from controller.guard import AccuracyGuard
from controller.latency import LatencyModel, MeasuredExits, measured_exits
from controller.lease import Lease, LeaseLostError
from controller.tuner import TunerSettings, back_off, evaluate, tune_held_out
from controller.window import FeedbackWindow, WindowView
from early_exit.errors import EarlyExitError
from early_exit.exit_config import ExitConfig
from early_exit.exit_rule import NEVER_EXIT, TIGHTEST_OPEN, any_exit
from early_exit.feedback import FeedbackRecord
from early_exit.keys import DEFAULT_PREFIX, RedisKeys
from early_exit.manifest import Manifest

LOGGER = logging.getLogger(__name__)

GROUP = "controller"
STATUS_TTL_S = 60  # a status document outlives the last active controller that wrote it by this long
READ_CHUNK = 500  # feedback records per stream and read


@dataclass(frozen=True)
class ControllerSettings:
    """Args:
    tuner: accuracy guard and search parameters.
    window: samples kept per model.
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
    window: int = 2000
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
        thresholds = self._tune(view, exit_ms)
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
                   f"{measured.mean_saving_ms():.2f} ms; {measured.count} samples, busy {view.busy:.0%})")
        if proposal is None:
            old = np.asarray([self.current.thresholds[r] for r in view.ramps])
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
        choose = view.sequence % 2 == 0
        held_out = view.subset(np.flatnonzero(~choose))
        current = np.asarray([self.current.thresholds[r] for r in view.ramps])
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
        if self.trial is not None:
            trial, self.trial = self.trial, None
            if saving > trial.baseline_ms:
                LOGGER.info("%s: ramps %s kept: measured saving %.2f ms beats %.2f ms", self.manifest.name,
                            view.ramps, saving, trial.baseline_ms)
                self.probe_after = self.settings.probe_after
                return None
            LOGGER.info("%s: ramps %s rolled back to %s: measured saving %.2f ms, not above %.2f ms",
                        self.manifest.name, view.ramps, sorted(trial.previous), saving, trial.baseline_ms)
            if not trial.previous:
                return self._switch_off(tuned, "the probe did not pay either", measured)
            return dict(trial.previous)
        if saving <= 0:
            return self._switch_off(tuned, f"early exits do not pay at the current load ({saving:.2f} ms measured)",
                                    measured)
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
        (traffic may have changed while the exits were off); the probe is judged on both.
        """
        view = self.window.view()
        if self.parked_cost is None or self.window.ramps != () or view.size < self.settings.min_fresh:
            return True
        predicted = self.parked_cost.mean_saving_ms(view.busy)
        if predicted > 0:
            return True
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


def _percentages(shares: list[float]) -> str:
    return "[" + ", ".join(f"{100 * share:.0f}%" for share in shares) + "]"


def _snapped(thresholds: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Each open threshold raised to the lowest confidence in the window that clears it: the same exits on the
    window, and never looser than needed for them (the tuner's thresholds are chosen the same way)."""
    snapped = np.array(thresholds, dtype=float)
    for r, threshold in enumerate(snapped):
        clearing = confidence[r][confidence[r] >= threshold]
        if threshold < NEVER_EXIT and clearing.size:
            snapped[r] = min(float(clearing.min()), TIGHTEST_OPEN)
    return snapped


class RecentRecords:
    """Digests of the last ``capacity`` feedback records read, so a record written twice is observed once.

    A backend's XADD pipeline that redis-py retries after a lost reply writes its records again. Every record
    carries its batch's own timestamp and timings, so two distinct batches never encode to the same bytes: a repeat
    of a recent record's exact fields is such a copy.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._order: deque[bytes] = deque()
        self._seen: set[bytes] = set()
        self._capacity = capacity

    def first_sighting(self, fields: dict[bytes, bytes]) -> bool:
        digest = hashlib.blake2b(digest_size=16)
        for key, value in sorted(fields.items()):
            for part in (key, value):
                digest.update(len(part).to_bytes(8, "little") + part)
        key = digest.digest()
        if key in self._seen:
            return False
        self._seen.add(key)
        self._order.append(key)
        if len(self._order) > self._capacity:
            self._seen.discard(self._order.popleft())
        return True


class ControllerService:
    """Args:
    client: Redis client.
    settings: control settings for every model.
    prefix: key namespace.
    models: restrict to these model names (default: every registered model).
    consumer: this controller's name within the consumer group. It must be the same after a restart (default: the
        host name, i.e. the pod name on Kubernetes), so the entries it read but had not acknowledged when it died
        are its own again.
    claim_idle: seconds an entry may stay read but unacknowledged before it counts as abandoned (its reader died)
        and is claimed, at start-up and then as often.
    lease_ttl: seconds of the controller lease (``None``: no lease, for a controller known to run alone, and for
        tests that drive ``poll`` themselves). With a lease, ``run`` acts only while holding it, renews it every
        third of it, and stands by (retrying as often) while another controller holds it; a lone controller takes
        it at once. A dead holder's successor takes over at most about four thirds of it later (the lapse, then one
        retry interval).
    status_every: seconds between two status documents of a model (written by ``poll``, i.e. only while active).
    """

    def __init__(
        self,
        client: redis.Redis,
        settings: ControllerSettings,
        prefix: str = DEFAULT_PREFIX,
        models: list[str] | None = None,
        consumer: str | None = None,
        claim_idle: float = 30.0,
        lease_ttl: float | None = None,
        status_every: float = 1.0,
    ) -> None:
        self.client = client
        self.settings = settings
        self.prefix = prefix
        self.only = set(models) if models else None
        self.consumer = consumer or socket.gethostname()
        self.claim_idle = claim_idle
        self.controllers: dict[str, ModelController] = {}
        self._streams: dict[str, str] = {}  # feedback stream key -> model name
        self._served: dict[str, int] = {}  # model name -> newest configuration version seen in its feedback
        self._recent = RecentRecords()
        self._last_claim = -math.inf
        self.status_every = status_every
        self._status_due: dict[str, float] = {}  # model name -> monotonic time its next status document is due
        self._replicas: dict[str, dict[str, None]] = {}  # model name -> replicas seen in its feedback (ordered set)
        # The holder name is unique per process: two processes under one consumer name must not share a lease.
        self.lease = None if lease_ttl is None else Lease(client, RedisKeys.controller_lease(prefix),
                                                          f"{self.consumer}:{secrets.token_hex(4)}", lease_ttl)
        self._active_epoch: int | None = None  # the lease epoch this controller took over under (None: standing by)
        self._renewed = -math.inf  # when the lease was last renewed (or its renewal tried)
        self._told_standby = False  # whether the log says this controller stands by

    def discover(self) -> None:
        """Attach to models that registered a manifest since the last call."""
        for raw in self.client.smembers(RedisKeys.models(self.prefix)):
            name = raw.decode()
            if name in self.controllers or (self.only is not None and name not in self.only):
                continue
            keys = RedisKeys(name, self.prefix)
            text = self.client.get(keys.manifest)
            if text is None:
                continue
            try:
                manifest = Manifest.from_json(text.decode())
            except EarlyExitError as exc:
                LOGGER.error("skipping %s: %s", name, exc)
                continue
            if manifest.profile is None or not manifest.ramps:
                continue
            current = read_config(self.client, keys) or ExitConfig(name, 0, dict(manifest.initial_thresholds))
            self._join_group(keys.feedback, start="$")  # a new deployment starts from now, not from old history
            self.controllers[name] = ModelController(manifest, current, self.settings)
            self._streams[keys.feedback] = name
            self._served[name] = 0
            self._replicas[name] = {}
            LOGGER.info("controlling %s (%d candidate ramps, config v%d)", name, len(manifest.ramps), current.version)

    def poll(self, block_ms: int = 200) -> int:
        """Read feedback of every model (abandoned entries first), step controllers, publish configurations;
        returns records read."""
        if not self.controllers:
            return 0
        if self.lease is not None and not self.lease.held:
            raise LeaseLostError("the controller lease lapsed: not reading feedback")  # a stand-by may hold it now
        try:
            read = self._claim_abandoned() if time.monotonic() - self._last_claim >= self.claim_idle else 0
            read += self._read_new(block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._rejoin_groups()
            return 0
        self._step_models()
        return read

    def _join_group(self, stream: str, start: str) -> None:
        try:
            self.client.xgroup_create(stream, GROUP, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _rejoin_groups(self) -> None:
        """Redis lost the consumer group (a restart without persistence, a flush): create it again on every stream.
        The models, their windows and the versions in use live on here; whatever the backends wrote since the loss
        is read (from the start of the new stream), and their re-registered manifests change nothing."""
        LOGGER.warning("consumer group %r is gone (Redis lost its data?); creating it again", GROUP)
        for stream in self._streams:
            self._join_group(stream, start="0")

    def _claim_abandoned(self, min_idle: float | None = None) -> int:
        """Take over entries another reader (or a previous run of this one) read but never acknowledged, once idle
        for ``min_idle`` seconds (default ``claim_idle``)."""
        self._last_claim = time.monotonic()
        idle = self.claim_idle if min_idle is None else min_idle
        read = 0
        for stream in self._streams:
            cursor: bytes | str = "0-0"
            while True:
                cursor, entries, *_ = self.client.xautoclaim(stream, GROUP, self.consumer,
                                                             min_idle_time=int(1000 * idle),
                                                             start_id=cursor, count=READ_CHUNK)
                read += self._consume(stream, entries)
                if cursor in (b"0-0", "0-0"):
                    break
        if read:
            LOGGER.info("claimed %d feedback records left unacknowledged by a stopped reader", read)
        return read

    def _read_new(self, block_ms: int) -> int:
        """Read what the backends wrote since the last poll, in chunks of ``READ_CHUNK`` records per stream, until
        the streams are drained or a window's worth is read: a controller that fell behind tunes once on its backlog,
        not once per chunk (measured in ``make bench``: five configurations published within 0.4 s while catching
        up, none of them serving an answer)."""
        streams = {stream: ">" for stream in self._streams}
        read, block = 0, block_ms
        while True:
            replies = self.client.xreadgroup(GROUP, self.consumer, streams, count=READ_CHUNK, block=block) or []
            read += sum(self._consume(stream.decode(), entries) for stream, entries in replies)
            if all(len(entries) < READ_CHUNK for _, entries in replies) or read >= self.settings.window:
                return read
            block = None  # the rest of a backlog is there already

    def _consume(self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Observe ``entries`` of one model's stream, then acknowledge them; returns how many."""
        name = self._streams[stream]
        for entry_id, fields in entries:
            if not self._recent.first_sighting(fields):
                continue
            try:
                record = FeedbackRecord.decode(fields)
            except EarlyExitError as exc:
                LOGGER.warning("%s: skipping feedback %s: %s", name, entry_id, exc)
                continue
            self._served[name] = max(self._served[name], record.config_version)
            if record.replica not in self._replicas[name]:
                self._new_replica(name, record)
            self.controllers[name].observe(record)
        if entries:
            self.client.xack(stream, GROUP, *(entry_id for entry_id, _ in entries))
        return len(entries)

    def _new_replica(self, name: str, record: FeedbackRecord) -> None:
        seen = self._replicas[name]
        seen[record.replica] = None
        if len(seen) > 4096:  # replicas come and go (every new pod has a new name): remember the recent ones only
            del seen[next(iter(seen))]
        LOGGER.info("%s: feedback from replica %s (serving v%d), %d replicas seen", name,
                    record.replica or "<unnamed: an older backend>", record.config_version, len(seen))

    def _write_status(self, name: str, controller: ModelController) -> None:
        """The model's status document, at most every ``status_every`` seconds: a single small ``SET``."""
        now = time.monotonic()
        if now < self._status_due.get(name, -math.inf):
            return
        self._status_due[name] = now + self.status_every
        window = controller.window
        status = {
            "model": name,
            "holder": self.lease.holder if self.lease is not None else self.consumer,
            "epoch": self._active_epoch,
            "config_version": controller.current.version,
            "served_version": self._served[name],
            "ramps": list(window.ramps or ()),
            "window": len(window),
            "replicas": window.replicas,
            "updated_at": time.time(),
        }
        self.client.set(RedisKeys(name, self.prefix).status, json.dumps(status), ex=STATUS_TTL_S)

    def _step_models(self) -> None:
        for name, controller in self.controllers.items():
            keys = RedisKeys(name, self.prefix)
            stored = read_config(self.client, keys)
            if stored is not None and stored.version > controller.current.version:
                controller.adopt(stored)  # someone else (an operator) wrote a newer one: build on it
            in_use = max(controller.current.version, self._served[name])
            if in_use > (stored.version if stored is not None else 0):
                # Redis lost the configuration in use (or went back to an older one): write it again, above what
                # is in use, so replicas that (re)start now load it and the backends accept it.
                LOGGER.warning("%s: Redis does not hold v%d, which is in use; re-publishing v%d's thresholds above "
                               "it", name, in_use, controller.current.version)
                self._publish(name, controller, controller.current.thresholds, f"controller@{self.consumer}")
            rounds = controller.rounds
            config = controller.step()
            if config is not None:
                self._publish(name, controller, config.thresholds, config.writer)
            if controller.manifest.exits_fixed and controller.rounds > rounds:
                self._resize(name, controller)
            self._write_status(name, controller)

    def _resize(self, name: str, controller: ModelController) -> None:
        """After a tuning round of an E3 entry: publish its plan re-sized for the exit rates its window measures
        under the thresholds now in use, when they moved away from those it was sized for."""
        keys = RedisKeys(name, self.prefix)
        try:
            plan = read_plan(self.client, keys)
        except EarlyExitError as exc:
            LOGGER.warning("%s: the stored E3 plan is unreadable (%s); not re-sizing", name, exc)
            return
        if plan is None:
            return
        resized = resize_plan(plan, controller.manifest, controller.window.view(), controller.current.thresholds,
                              self.settings.resizer)
        if resized is not None and publish_plan(self.client, keys, resized, self.lease):
            LOGGER.info("%s: plan revision %d: block models sized for %s of requests reaching them (sized for %s "
                        "before); queue delays %s us, replicas %s, threads %d", name, resized.revision,
                        _percentages(resized.expected["survivors"]), _percentages(plan.expected.get("survivors", [])),
                        [g.queue_delay_us for g in resized.groups], [g.replicas for g in resized.groups],
                        resized.threads)

    def _publish(self, name: str, controller: ModelController, thresholds: dict[int, float], writer: str) -> None:
        """Write the next version (above the one in use and above any the backends were seen serving, so none goes
        backwards even after Redis lost the key); a newer configuration from another writer wins instead. Raises
        ``LeaseLostError`` when this controller no longer holds the lease (nothing is written then)."""
        written = publish_config(self.client, RedisKeys(name, self.prefix), thresholds, writer,
                                 based_on=controller.current.version, floor=self._served[name], lease=self.lease)
        if written is not None:
            controller.committed(written)

    def run(self, stop_after: float | None = None) -> None:
        """Loop until interrupted (or for ``stop_after`` seconds), riding out Redis outages; with a lease, act only
        while holding it, and give it up on the way out so a stand-by need not wait for it to lapse."""
        deadline = None if stop_after is None else time.monotonic() + stop_after
        backoff = 0.5
        last_discovery = 0.0
        block_ms = 200 if self.lease is None else max(1, min(200, int(1000 * self.lease.ttl_s / 6)))
        try:
            while deadline is None or time.monotonic() < deadline:
                try:
                    if not self._lead():
                        assert self.lease is not None
                        pause = self.lease.ttl_s / 3
                        time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
                        continue
                    if time.monotonic() - last_discovery > 2.0:
                        self.discover()
                        last_discovery = time.monotonic()
                    if not self.controllers:
                        time.sleep(0.2 if self.lease is None else min(0.2, self.lease.ttl_s / 6))
                        continue
                    self.poll(block_ms)
                    backoff = 0.5
                except LeaseLostError as exc:
                    self._step_down(str(exc))
                except redis.RedisError as exc:
                    LOGGER.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            if self.lease is not None and self._active_epoch is not None:
                with contextlib.suppress(redis.RedisError):
                    self.lease.release()
                    LOGGER.info("released the controller lease")

    def _lead(self) -> bool:
        """Whether this controller is the active one: renews the lease every third of its time to live (or takes it
        when free), and takes over when it holds the lease under an epoch it has not acted under yet."""
        if self.lease is None:
            return True
        if not self.lease.held or time.monotonic() - self._renewed >= self.lease.ttl_s / 3:
            self._renewed = time.monotonic()
            if not self.lease.acquire_or_renew():
                if self._active_epoch is not None or not self._told_standby:
                    holder = self.client.get(self.lease.key)
                    name = holder.decode(errors="replace") if isinstance(holder, bytes) else holder
                    self._step_down(f"the controller lease is held by {name or 'nobody'}")
                return False
        if self.lease.epoch != self._active_epoch:
            self._take_over()
        return True

    def _take_over(self) -> None:
        """Become the active controller under the lease's current epoch.

        Whatever this process knew from an earlier hold may be stale (another controller may have published since),
        so every model starts again from Redis: its stored configuration is adopted, its window refilled from
        feedback. Entries the group delivered to anyone but never acknowledged are claimed at once, not after
        ``claim_idle``: whoever read them held the lease before us, and since its lease lapsed it is dead or fenced,
        so nobody else will acknowledge them.
        """
        assert self.lease is not None and self.lease.epoch is not None
        epoch = self.lease.epoch
        LOGGER.info("holding the controller lease as %s (epoch %d): active", self.lease.holder, epoch)
        self._forget_models()
        self.discover()
        self._claim_abandoned(min_idle=0.0)
        self._active_epoch = epoch  # only now: a take-over cut short by a Redis error is done again
        self._told_standby = False

    def _step_down(self, reason: str) -> None:
        """Stop acting (no more reads, no more writes) and stand by; what the models' controllers knew is dropped, a
        later take-over starts again from Redis."""
        LOGGER.log(logging.WARNING if self._active_epoch is not None else logging.INFO, "standing by: %s", reason)
        self._told_standby = True
        self._active_epoch = None
        self._renewed = -math.inf
        self._forget_models()

    def _forget_models(self) -> None:
        self.controllers.clear()
        self._streams.clear()
        self._served.clear()
        self._replicas.clear()
        self._status_due.clear()
