"""Ship feedback records to the Redis Stream from a background thread.

Inference never waits on Redis: ``offer`` is a non-blocking put into a bounded queue. When the queue is full or Redis
is unreachable, records are dropped and counted; the thread reconnects with back-off.

The model's manifest (and its name in the model set) is how the controller finds the model. It is registered when the
publisher starts, whether or not feedback flows, and again every ``register_every`` seconds and after every failure: a Redis that restarted without its data is
often never seen failing, because redis-py's retries hide a short outage. Registering is two idempotent writes, so
repeating it is cheap. Those retries can also replay a whole XADD pipeline whose reply was lost, writing its records
twice; rather than give up retries (and lose records on every blip), the controller drops a record that repeats a
recent one byte for byte. The stream is trimmed on every XADD (``MAXLEN ~``), so Redis memory stays bounded when no
controller reads it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import redis

from early_exit.feedback import FeedbackRecord
from early_exit.keys import RedisKeys

LOGGER = logging.getLogger(__name__)


class FeedbackPublisher:
    """Args:
    client: Redis client (its own connection pool; socket timeouts keep a dead server from stalling the thread).
    keys: key layout of the model.
    manifest_json: manifest to register on connection.
    stream_maxlen: approximate cap of the stream length in records (``XADD MAXLEN ~``): minutes of feedback for a
        controller that is down, tens of MB at most (a record of 32 samples and 8 ramps is about 2.5 KB).
    buffer: queue capacity in records.
    on_published / on_dropped: metric hooks, called with a count.
    flush_interval: seconds to gather records into one round trip; fewer round trips leave more CPU (and the GIL)
        to inference.
    register_every: seconds between registrations of the manifest while feedback flows.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        manifest_json: str,
        stream_maxlen: int = 10_000,
        buffer: int = 1024,
        on_published: Callable[[int], None] = lambda n: None,
        on_dropped: Callable[[int], None] = lambda n: None,
        flush_interval: float = 0.25,
        register_every: float = 10.0,
    ) -> None:
        self._flush_interval = flush_interval
        self._client = client
        self._keys = keys
        self._manifest_json = manifest_json
        self._maxlen = stream_maxlen
        self._queue: queue.Queue[FeedbackRecord | None] = queue.Queue(maxsize=buffer)
        self._on_published = on_published
        self._on_dropped = on_dropped
        self._register_every = register_every
        self._register_due = 0.0  # monotonic time of the next registration
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"feedback-{keys.model}", daemon=True)
        self._thread.start()

    def offer(self, record: FeedbackRecord) -> None:
        """Enqueue without blocking; a full buffer drops the record."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._on_dropped(1)

    def close(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _register(self) -> None:
        pipe = self._client.pipeline()
        pipe.set(self._keys.manifest, self._manifest_json)
        pipe.sadd(RedisKeys.models(self._keys.prefix), self._keys.model)
        pipe.execute()
        self._register_due = time.monotonic() + self._register_every

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:  # wake for the next registration even when no feedback flows (every exit off)
                record = self._queue.get(timeout=max(0.0, self._register_due - time.monotonic()))
            except queue.Empty:
                backoff = self._ship([], backoff)
                continue
            if record is None:
                return
            batch = [record]
            self._stopping.wait(self._flush_interval)
            while len(batch) < 256:  # drain what is queued by now into one round trip
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._stopping.set()
                    break
                batch.append(item)
            backoff = self._ship(batch, backoff)

    def _ship(self, batch: list[FeedbackRecord], backoff: float) -> float:
        """Register when due and write ``batch`` in one round trip; returns the back-off for the next failure."""
        try:
            if time.monotonic() >= self._register_due:
                self._register()
            if batch:
                pipe = self._client.pipeline(transaction=False)
                for item in batch:
                    pipe.xadd(self._keys.feedback, item.encode(), maxlen=self._maxlen, approximate=True)
                pipe.execute()
                self._on_published(len(batch))
            return 0.1
        except redis.RedisError as exc:
            self._register_due = 0.0  # register again as soon as Redis answers
            if batch:
                self._on_dropped(len(batch))
            LOGGER.warning("feedback to Redis failed (%s); dropped %d records, retrying in %.1fs",
                           exc, len(batch), backoff)
            self._stopping.wait(backoff)
            return min(backoff * 2, 5.0)
