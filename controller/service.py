"""The online control loop: consume feedback, tune thresholds per model, publish new configurations.

One ``ModelController`` per served model holds its window and its current configuration; ``ControllerService``
discovers models from Redis, reads every feedback stream through one consumer group (so a restarted or replicated
controller resumes instead of re-reading) and steps each model controller. Redis outages are waited out: the backends
keep serving on their last configuration meanwhile.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import numpy as np
import redis

from controller.adjuster import AdjusterSettings, RampAdjuster
from controller.config_store import read_config, write_config
from controller.latency import LatencyModel
from controller.tuner import ThresholdTuner, TunerSettings
from controller.window import FeedbackWindow
from early_exit.errors import EarlyExitError
from early_exit.exit_config import NEVER_EXIT, ExitConfig
from early_exit.feedback import FeedbackRecord
from early_exit.keys import DEFAULT_PREFIX, RedisKeys
from early_exit.manifest import Manifest

LOGGER = logging.getLogger(__name__)

GROUP = "controller"


@dataclass(frozen=True)
class ControllerSettings:
    """Args:
    tuner: accuracy budget and search parameters.
    window: samples kept per model.
    min_fresh: new samples required before thresholds may change again (never loosen on stale evidence).
    min_change: smallest threshold change worth publishing.
    adjust_every: re-examine the active ramp set every this many tuning rounds (0: never).
    adjuster: overhead budget and ramp count bound for ramp adjustment.
    """

    tuner: TunerSettings = TunerSettings()
    window: int = 2000
    min_fresh: int = 256
    min_change: float = 0.002
    adjust_every: int = 4
    adjuster: AdjusterSettings = AdjusterSettings()

    def __post_init__(self) -> None:
        if self.min_fresh <= 0 or self.min_fresh > self.window:
            raise ValueError(f"min_fresh must be in [1, window={self.window}], got {self.min_fresh}")


class ModelController:
    """Tunes one model's thresholds from its feedback window."""

    def __init__(self, manifest: Manifest, current: ExitConfig, settings: ControllerSettings) -> None:
        self.manifest = manifest
        self.current = current
        self.settings = settings
        self.window = FeedbackWindow(settings.window)
        self.tuner = ThresholdTuner(settings.tuner)
        self.adjuster = RampAdjuster(len(manifest.ramps), settings.adjuster)
        self.rounds = 0

    def observe(self, record: FeedbackRecord) -> None:
        if record.config_version < self.current.version and record.ramps != self.current.active_ramps:
            return  # from before a ramp-set change: cannot inform the current ramps
        self.window.add(record)

    def step(self) -> ExitConfig | None:
        """A new configuration when fresh feedback justifies one, else ``None``.

        Normally ``min_fresh`` new samples are needed; when the answers actually served on the window already break
        the budget, a quarter of that is enough, so the guard tightens without waiting for a full round.
        """
        if self.window.ramps != self.current.active_ramps or not self.window.fresh:
            return None
        view = self.window.view()
        breached = view.realised_accuracy() < 1.0 - self.settings.tuner.budget
        if self.window.fresh < (self.settings.min_fresh // 4 if breached else self.settings.min_fresh):
            return None
        self.window.fresh = 0
        latency = LatencyModel.from_manifest(self.manifest, view.mean_batch_size)
        exit_ms = latency.exit_latencies(view.ramps)
        thresholds = self.tuner.tune(view.confidence, view.prediction, view.final, exit_ms)
        new = {r: round(float(t), 6) for r, t in zip(view.ramps, thresholds)}
        self.rounds += 1
        adjust = self.settings.adjust_every and self.rounds % self.settings.adjust_every == 0
        proposal = self.adjuster.propose(view.ramps, thresholds, view.confidence, latency) if adjust else None
        if proposal is not None:
            new = {r: new.get(r, NEVER_EXIT) for r in proposal}  # new ramps observe first, the tuner opens them
            LOGGER.info("%s: active ramps %s -> %s", self.manifest.name, view.ramps, proposal)
        else:
            old = np.asarray([self.current.thresholds[r] for r in view.ramps])
            if np.abs(thresholds - old).max(initial=0.0) < self.settings.min_change:
                return None
        evaluation = self.tuner.evaluate(thresholds, view.confidence, view.prediction == view.final, exit_ms)
        config = ExitConfig(self.manifest.name, self.current.version + 1, new, writer=f"controller@{socket.gethostname()}")
        LOGGER.info(
            "%s v%d: window %d samples, realised accuracy %.4f -> expected %.4f, saving %.2f ms; thresholds %s",
            self.manifest.name, config.version, view.size, view.realised_accuracy(), evaluation.accuracy,
            evaluation.saving_ms, config.thresholds,
        )
        self.current = config
        return config


class ControllerService:
    """Args:
    client: Redis client.
    settings: control settings for every model.
    prefix: key namespace.
    models: restrict to these model names (default: every registered model).
    consumer: consumer name within the group.
    """

    def __init__(
        self,
        client: redis.Redis,
        settings: ControllerSettings,
        prefix: str = DEFAULT_PREFIX,
        models: list[str] | None = None,
        consumer: str | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.prefix = prefix
        self.only = set(models) if models else None
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.controllers: dict[str, ModelController] = {}

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
            try:
                self.client.xgroup_create(keys.feedback, GROUP, id="$", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self.controllers[name] = ModelController(manifest, current, self.settings)
            LOGGER.info("controlling %s (%d candidate ramps, config v%d)", name, len(manifest.ramps), current.version)

    def poll(self, block_ms: int = 200) -> int:
        """Read pending feedback of every model, step controllers, publish configurations; returns records read."""
        if not self.controllers:
            return 0
        streams = {RedisKeys(name, self.prefix).feedback: ">" for name in self.controllers}
        replies = self.client.xreadgroup(GROUP, self.consumer, streams, count=500, block=block_ms) or []
        read = 0
        for stream, entries in replies:
            name = stream.decode().split(":")[-2]
            controller = self.controllers[name]
            ids = []
            for entry_id, fields in entries:
                ids.append(entry_id)
                try:
                    controller.observe(FeedbackRecord.decode(fields))
                except EarlyExitError as exc:
                    LOGGER.warning("%s: skipping feedback %s: %s", name, entry_id, exc)
            if ids:
                self.client.xack(stream, GROUP, *ids)
            read += len(ids)
        for name, controller in self.controllers.items():
            stored = read_config(self.client, RedisKeys(name, self.prefix))
            if stored is not None and stored.version > controller.current.version:
                controller.current = stored  # someone else (an operator) wrote a newer one: build on it
            config = controller.step()
            if config is not None:
                write_config(self.client, RedisKeys(name, self.prefix), config)
        return read

    def run(self, stop_after: float | None = None) -> None:
        """Loop until interrupted (or for ``stop_after`` seconds), riding out Redis outages."""
        deadline = None if stop_after is None else time.monotonic() + stop_after
        backoff = 0.5
        last_discovery = 0.0
        while deadline is None or time.monotonic() < deadline:
            try:
                if time.monotonic() - last_discovery > 2.0:
                    self.discover()
                    last_discovery = time.monotonic()
                if not self.controllers:
                    time.sleep(0.2)
                    continue
                self.poll()
                backoff = 0.5
            except redis.RedisError as exc:
                LOGGER.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
