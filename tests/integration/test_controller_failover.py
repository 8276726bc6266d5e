"""Two real controller processes on a real redis-server, no Triton: the test plays the backend (a registered manifest,
feedback records stamped with the configuration version in use). The active controller is killed with SIGKILL while
feedback streams in; the stand-by takes over within about the lease's time to live, versions only go up, and every
feedback entry written is read and acknowledged, including those the killed one had read but not acknowledged."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import redis

from controller.config_store import read_config
from controller.service import GROUP
from early_exit.keys import RedisKeys
from tests.integration.conftest import watch_versions
from tests.unit.test_model_controller import _manifest, _records
from tests.unit.test_service import _register
from workload.stack import Process, free_port, start_controller, start_redis

pytestmark = pytest.mark.integration

TTL = 2.0
LEASE = RedisKeys.controller_lease()
CONTROLLER_ARGS = ["--lease-ttl", str(TTL), "--window", "400", "--min-fresh", "64", "--adjust-every", "0",
                   "--z", "0", "--budget", "0.01", "--claim-idle", "30", "--log-level", "INFO"]


def _eventually(condition: Callable[[], bool], timeout: float, what: str, logs: Sequence[Path] = ()) -> float:
    """Wait for ``condition``; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tails}")


def _holder(client: redis.Redis) -> str:
    raw = client.get(LEASE)
    return raw.decode().split(":")[0] if raw else ""


class Backend:
    """Writes feedback like a backend under load: one batch of 8 every 10 ms, stamped with the stored version,
    alternating every 100 batches (two windows) between a ramp that agrees with the final exit and one that answers wrongly (so
    the controller keeps opening and closing it, i.e. keeps publishing)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client, self.keys = client, keys
        self.written: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            stored = read_config(self.client, self.keys)
            good = (len(self.written) // 100) % 2 == 0
            (record,) = _records(stored.version if stored else 0, 8, ramp_right=good, seed=len(self.written),
                                 exit_value=2 if good else 0)
            self.written.append(self.client.xadd(self.keys.feedback, record.encode()))
            time.sleep(0.01)

    def __enter__(self) -> Backend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_killed_controller_is_replaced_by_its_stand_by_and_no_feedback_is_lost(tmp_path: Path) -> None:
    port = free_port()
    server = start_redis(port, tmp_path / "redis")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    keys = _register(client, _manifest())
    processes: list[Process] = []
    versions, listener = watch_versions(client, keys)
    try:
        first = start_controller(url, tmp_path / "a", ["--consumer", "a", *CONTROLLER_ARGS])
        processes.append(first)
        _eventually(lambda: _holder(client) == "a", 30, "the first controller taking the lease", [first.log])
        second = start_controller(url, tmp_path / "b", ["--consumer", "b", *CONTROLLER_ARGS])
        processes.append(second)
        logs = [first.log, second.log]
        _eventually(lambda: "standing by" in second.log.read_text(), 30, "the second controller standing by", logs)
        _eventually(lambda: any(g["name"] == GROUP.encode() for g in client.xinfo_groups(keys.feedback)), 10,
                    "the consumer group", logs)

        with Backend(client, keys) as backend:
            _eventually(lambda: len(versions) >= 2, 30, "the active controller publishing", logs)
            assert _holder(client) == "a"
            consumers = {c["name"] for c in client.xinfo_consumers(keys.feedback, GROUP)}
            assert consumers == {b"a"}  # the stand-by never read a thing

            os.kill(first.popen.pid, signal.SIGKILL)  # mid-stream, perhaps mid-round or mid-write
            first.popen.wait(10)
            killed = time.monotonic()
            before = len(versions)
            # What a controller killed mid-round leaves: entries delivered to it and never acknowledged. The test
            # takes some more in its name (the writer keeps adding), so there surely are some.
            def read_for_the_dead_one() -> bool:
                return bool(client.xreadgroup(GROUP, "a", {keys.feedback: ">"}, count=20))

            _eventually(read_for_the_dead_one, 5, "feedback left for the dead controller", logs)

            _eventually(lambda: _holder(client) == "b", 4 * TTL, "the stand-by taking over", logs)
            assert time.monotonic() - killed < TTL * 4 / 3 + 2.0  # the lapse, one retry interval, slack
            # Claimed at once on take-over, not after --claim-idle (30 s).
            _eventually(lambda: client.xpending(keys.feedback, GROUP)["pending"] == 0, 5, "the claim", logs)
            # Feedback keeps coming and the new controller keeps tuning on it.
            after = len(backend.written)
            _eventually(lambda: len(versions) >= before + 2 and len(backend.written) >= after + 100, 20,
                        "the new controller publishing", logs)

        def caught_up() -> bool:
            (group,) = client.xinfo_groups(keys.feedback)
            return group["lag"] == 0 and client.xpending(keys.feedback, GROUP)["pending"] == 0

        _eventually(caught_up, 15, "every feedback entry read and acknowledged", logs)
        (group,) = client.xinfo_groups(keys.feedback)
        assert client.xlen(keys.feedback) == len(backend.written) == group["entries-read"]
        assert group["last-delivered-id"] == backend.written[-1]

        stored = read_config(client, keys)  # one whole document, never half of one
        assert stored is not None and versions == sorted(set(versions)) and stored.version == versions[-1]
        assert second.popen.poll() is None
        second.stop()
        assert client.get(LEASE) is None  # released on the way out: a third one would not have to wait
    finally:
        listener.stop()
        listener.join(5)
        for process in processes:
            process.stop()
        server.stop()
