"""The online control loop: consume feedback, tune thresholds per model, publish new configurations.

One ``ModelController`` per served model holds its window and its current configuration; ``ControllerService``
discovers models from Redis, reads every feedback stream through one consumer group (so a restarted or replicated
controller resumes instead of re-reading) and steps each model controller. Redis outages are waited out: the backends
keep serving on their last configuration meanwhile.

What each model controller decides, and when, is described in ``controller.model_controller``.

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
import hashlib
import json
import logging
import math
import secrets
import socket
import time
from collections import deque

import redis

from controller.config_store import publish_config, publish_plan, read_config, read_plan
from controller.e3_resizer import resize_plan
from controller.lease import Lease, LeaseLostError
from controller.model_controller import ControllerSettings, ModelController
from early_exit.errors import EarlyExitError
from early_exit.exit_config import ExitConfig
from early_exit.feedback import FeedbackRecord
from early_exit.keys import DEFAULT_PREFIX, RedisKeys
from early_exit.manifest import Manifest

LOGGER = logging.getLogger(__name__)

GROUP = "controller"
STATUS_TTL_S = 60  # a status document outlives the last active controller that wrote it by this long
READ_CHUNK = 500  # feedback records per stream and read


def _percentages(shares: list[float]) -> str:
    return "[" + ", ".join(f"{100 * share:.0f}%" for share in shares) + "]"


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
