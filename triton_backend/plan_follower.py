"""Keep an E3 router's block models sized as the plan in force says (``RedisKeys.e3_plan``).

The router registers its plan as prepared unless Redis holds a plan of the same origin (the same ``prepare.e3``
run): a revision the controller re-sized (``controller.e3_resizer``) is never overwritten by a replica that
(re)starts, a plan left from an earlier deployment is, and a Redis that lost its data learns the prepared plan again.
Every ``poll_interval`` seconds the follower reads the plan in force; when its sizing differs from what this replica
applied, it reloads each block model whose configuration changed through the model-control API of the server it runs
in (its HTTP endpoint, ``APPARATE_TRITON_HTTP``; the configuration goes as JSON; it needs
``--model-control-mode=explicit``). Triton keeps serving with the old instances until the new ones are ready, so no
request fails. Not ``pb_utils.load_model``: called from a thread of the router's stub, it stalled the router's event
loop, and with it every request, for the whole reload (measured: 11 s, and requests beyond ``max_in_flight``
failed); the same call from another model's stub left the router serving.

The first block group runs in the router's own worker threads, which the follower re-sizes through ``resize_first``
(new workers take the next batches), and the router's batcher keeps its prepared delay: the router is never reloaded
under its own requests. Each Triton replica (pod) has its own router and block models, each
follows the plan in force on its own, and the controller never needs to reach a server. A plan that deploys other
block models (other exits: a new ``prepare.e3``) is not applied, and a reload that fails (a server not in explicit
mode, say) is logged and tried again at the next revision or after ``retry_after`` seconds; the replica keeps
serving as it was.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import redis

from early_exit.e3_plan import E3Plan, block_model_name
from early_exit.errors import ArtifactError
from early_exit.keys import RedisKeys

LOGGER = logging.getLogger(__name__)

#: ``host:port`` of the HTTP endpoint of the server the router runs in (``triton_backend.server`` sets it).
TRITON_HTTP_ENV = "APPARATE_TRITON_HTTP"


def reload_model(model: str, config: str, server: str | None = None, timeout: float = 300.0) -> None:
    """Load ``model`` again with ``config`` (JSON) through Triton's HTTP model-control API; raises ``RuntimeError``
    with Triton's reason when it refuses."""
    server = server or os.environ.get(TRITON_HTTP_ENV) or "127.0.0.1:8000"
    request = urllib.request.Request(f"http://{server}/v2/repository/models/{model}/load",
                                     data=json.dumps({"parameters": {"config": config}}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{exc.code}: {exc.read().decode(errors='replace')}") from exc
    except OSError as exc:
        raise RuntimeError(f"{server} unreachable: {exc}") from exc


class PlanFollower:
    """Args:
    client: Redis client.
    keys: the router's key layout.
    router: the router's model name (its block models are ``<router>_b<k>``).
    prepared: the plan in the router's version folder, applied when the server loaded the block models.
    classes: output classes (block models answer probabilities over them).
    load_model: ``(model name, configuration JSON)``, raising when Triton refuses the reload (``reload_model``).
    resize_first: ``(replicas, threads)`` of the first group, which the router runs itself.
    poll_interval: seconds between two reads of the plan in force.
    retry_after: seconds before a failed revision is tried again.
    on_applied / on_failed: metric hooks, called with the revision applied, and on a refused reload.
    """

    def __init__(self, client: redis.Redis, keys: RedisKeys, router: str, prepared: E3Plan, classes: int,
                 load_model: Callable[[str, str], None] = reload_model,
                 resize_first: Callable[[int, int], None] = lambda replicas, threads: None, poll_interval: float = 2.0,
                 retry_after: float = 60.0, on_applied: Callable[[int], None] = lambda revision: None,
                 on_failed: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self.keys = keys
        self.router = router
        self.prepared = prepared
        self.applied = prepared
        self.classes = classes
        self.load_model = load_model
        self.resize_first = resize_first
        self.poll_interval = poll_interval
        self.retry_after = retry_after
        self.on_applied = on_applied
        self.on_failed = on_failed
        on_applied(prepared.revision)
        self._failed: tuple[int, float] | None = None  # revision, monotonic time of its failure
        self._told: set[str] = set()  # warnings already logged (once each)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"plan-{router}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_interval):
            self.follow()

    def follow(self) -> None:
        """Register the prepared plan unless one of its origin is stored, then apply the stored one when its sizing
        differs from what this replica serves."""
        try:
            raw = self.client.get(self.keys.e3_plan)
            plan = self._stored(raw)
            if plan is None or plan.origin != self.prepared.origin:
                self.client.set(self.keys.e3_plan, self.prepared.to_json())
                plan = self.prepared
        except redis.RedisError as exc:
            self._warn_once("redis", "%s: cannot read its E3 plan from Redis (%s); keeping revision %d", self.router,
                            exc, self.applied.revision)
            return
        self._told.discard("redis")
        if plan.sizing == self.applied.sizing:
            if plan.revision != self.applied.revision:  # a metric update is a round trip to the server: only changes
                self.on_applied(plan.revision)
            self.applied = plan
            return
        if not plan.same_groups(self.applied):
            self._warn_once(f"groups:{plan.revision}", "%s: ignoring E3 plan revision %d: it deploys other block "
                            "models than this router's (moving exits takes a new prepare.e3 and a reload)",
                            self.router, plan.revision)
            return
        if self._failed is not None and self._failed[0] == plan.revision and \
                time.monotonic() - self._failed[1] < self.retry_after:
            return
        self._apply(plan)

    def _stored(self, raw: bytes | None) -> E3Plan | None:
        if raw is None:
            return None
        try:
            return E3Plan.from_json(raw)
        except ArtifactError as exc:
            self._warn_once(f"bad:{hash(raw)}", "%s: replacing the malformed E3 plan stored in Redis: %s", self.router,
                            exc)
            return None

    def _apply(self, plan: E3Plan) -> None:
        started = time.monotonic()
        changed = [index for index in range(1, len(plan.groups))
                   if plan.block_model_config(self.router, index, self.classes)
                   != self.applied.block_model_config(self.router, index, self.classes)]
        for index in changed:
            name = block_model_name(self.router, index)
            try:
                self.load_model(name, json.dumps(plan.block_model_config(self.router, index, self.classes)))
            except RuntimeError as exc:
                self._failed = (plan.revision, time.monotonic())
                self.on_failed()
                LOGGER.warning("%s: cannot reload %s for E3 plan revision %d (%s); serving as before, retrying in "
                               "%.0f s", self.router, name, plan.revision, exc, self.retry_after)
                return
        first = (plan.groups[0].replicas, plan.threads)
        if first != (self.applied.groups[0].replicas, self.applied.threads):
            self.resize_first(*first)
        self.applied = plan
        self._failed = None
        self.on_applied(plan.revision)
        LOGGER.info("%s: applied E3 plan revision %d in %.1f s: reloaded %s; queue delays %s us, replicas %s, "
                    "threads %d", self.router, plan.revision, time.monotonic() - started,
                    [block_model_name(self.router, index) for index in changed],
                    [group.queue_delay_us for group in plan.groups], [group.replicas for group in plan.groups],
                    plan.threads)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._told:
            self._told.add(key)
            LOGGER.warning(message, *args)
