"""A lease in Redis that makes one of several controllers the active one.

Two controllers may run at once (a stand-by for fail-over, or the old and the new pod of a rolling update): only the
holder of the lease reads feedback, tunes and publishes; the others retry taking it. The lease is a key holding its
holder's name with a time to live: a holder that dies (``kill -9``, a lost node) simply stops renewing it, and once it
lapses a stand-by takes it, so a dead controller blocks the others for at most one time to live and never forever.

A lapsed lease does not mean its old holder is dead: it may be stalled (a pause, a slow round, a partition) and wake
up still believing it is active. Two things keep it harmless:

- Every acquisition increments a counter stored next to the lease (``<key>:epoch``), the *fencing token*. A holder
  remembers the epoch it acquired; if it finds a different one later, somebody else held the lease in between.
- A configuration is only written inside a transaction that watches the lease and checks that the holder and the
  epoch are still ours (``config_store.publish_config(..., lease=...)``). A stale holder's write is refused by Redis
  itself, whatever the stale holder believes, so no clock or timer can let two writers publish.

Holder names must be unique per process, not per controller name: two processes under one name would otherwise
both "renew" one lease and both be active. The service appends a random suffix to its consumer name.

Acquiring and renewing are one Lua script, so "take it when free, or extend it when ours" and the epoch increment
happen atomically: a holder can never be seen without its epoch, and a renewal can never extend somebody else's lease.
"""

from __future__ import annotations

import time

import redis

from early_exit.errors import EarlyExitError

# KEYS[1] lease, KEYS[2] epoch; ARGV[1] holder, ARGV[2] time to live in ms. Returns the epoch held, or nil when
# somebody else holds the lease.
_ACQUIRE_OR_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    local epoch = redis.call('GET', KEYS[2])
    if epoch then
        return tonumber(epoch)
    end
    return redis.call('INCR', KEYS[2])
end
if current then
    return false
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""

# KEYS[1] lease; ARGV[1] holder. Deletes the lease only if it is still ours (a lapsed lease may be someone else's).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLostError(EarlyExitError):
    """This process no longer holds the controller lease: another controller is (or may become) the active one."""


class Lease:
    """One process's claim on a Redis lease.

    Args:
        client: Redis client.
        key: the lease key (``RedisKeys.controller_lease``); its epoch counter lives at ``<key>:epoch``.
        holder: this process's name in the lease; unique per process (see the module docstring).
        ttl_s: seconds the lease lasts without renewal, i.e. how long a dead holder blocks its stand-bys. Renew it
            well within that (every third of it, say), so one slow renewal does not cost the lease.
    """

    def __init__(self, client: redis.Redis, key: str, holder: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the lease time to live must be positive, got {ttl_s}")
        self.client = client
        self.key = key
        self.epoch_key = f"{key}:epoch"
        self.holder = holder
        self.ttl_s = ttl_s
        self.epoch: int | None = None  # the fencing token of our current hold; None while not holding
        self._valid_until = -float("inf")  # monotonic time until which the lease is surely still ours
        self._acquire_or_renew = client.register_script(_ACQUIRE_OR_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def keys(self) -> tuple[str, str]:
        """The keys a fenced write must ``WATCH``: the lease and its epoch."""
        return self.key, self.epoch_key

    @property
    def held(self) -> bool:
        """Whether the lease is ours by our own clock: acquired or renewed less than ``ttl_s`` ago.

        The deadline counts from *before* the last successful request was sent, so it ends no later than Redis's own
        expiry (clock rates permitting). It is what a holder checks before acting on its own; writes are fenced by
        Redis (``verify``) regardless.
        """
        return self.epoch is not None and time.monotonic() < self._valid_until

    def acquire_or_renew(self) -> bool:
        """Take the lease when it is free, extend it when it is ours; returns whether we hold it now.

        ``epoch`` changes when this call acquired the lease anew (including after our own hold had lapsed, since
        somebody else may have held it in between): callers compare it with the epoch they last acted under. A Redis
        error propagates and leaves the local state as it was (the lease stays ours only until the last deadline).
        """
        sent = time.monotonic()
        epoch = self._acquire_or_renew(keys=[self.key, self.epoch_key], args=[self.holder, self._ttl_ms])
        if epoch is None:
            self.epoch = None
            self._valid_until = -float("inf")
            return False
        self.epoch = int(epoch)
        self._valid_until = sent + self.ttl_s
        return True

    def release(self) -> None:
        """Give the lease up (on a clean shutdown) so a stand-by takes over at once instead of after ``ttl_s``."""
        self.epoch = None
        self._valid_until = -float("inf")
        self._release(keys=[self.key], args=[self.holder])

    def verify(self, client: redis.Redis) -> None:
        """Raise ``LeaseLostError`` unless Redis says the lease is held by us under our epoch.

        Call it on a pipeline that ``WATCH``es ``keys`` before its ``MULTI``: the check then holds until ``EXEC``,
        because any change of the lease in between (a take-over, a renewal) aborts the transaction, which the
        caller retries and this check runs again. (Should the lease merely expire in between, the write may go
        through: nobody else held it meanwhile, so nobody else can have written.)
        """
        holder, epoch = client.get(self.key), client.get(self.epoch_key)
        if isinstance(holder, bytes):
            holder = holder.decode(errors="replace")
        if self.epoch is None or holder != self.holder or epoch is None or int(epoch) != self.epoch:
            self.epoch = None
            self._valid_until = -float("inf")
            raise LeaseLostError(f"the controller lease {self.key} is no longer held by {self.holder}")

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(1000 * self.ttl_s))
