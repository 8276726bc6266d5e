"""Request path of an E3 entry (backend ``apparate_e3``): request in → first block group → block models in turn →
answer at the first confident exit → sampled samples run on to the end → feedback.

The router is the model plain clients call (same inputs and outputs as the Apparate entry, non-decoupled, so unary
gRPC and HTTP work). ``execute`` is a coroutine that starts one asyncio task for the batch Triton's batcher gave it
and returns at once; the task runs the plan's first block group on the batch itself, in one of the router's worker
threads (every request needs that group: a call to another model would only add a BLS call; on MiniLM, E3's CPU per
request fell from 13 % to 20-31 % below the original model's when the router took the group over), then sends the
samples still computing through the later groups' block models by BLS (``async_exec``), one call per group for the
whole batch, and answers each request through its response sender as soon as its samples are decided. Batches waiting
for the first group are merged into one call when a worker frees up (``MergingWorkers``), as Triton's batcher would
merge them at a block model. One router instance thus keeps many batches in flight, and each block model's own dynamic
batcher merges the survivors of many of them into full batches: exited samples stop computing, later blocks still run
full batches. A call per group and batch, not per request, keeps the router's cost per sample small under load, when
its batches are large. The first group's replicas are worker threads, spread over the router's instances: kernels
run outside Python's lock, so the event loop keeps answering while they compute, but each operator's dispatch takes
the lock, which a model of many small operators pays for (ResNet-56's blocks 0-23 on a CPU, batch 1-2: two worker
threads run 69-79 % of the samples per second two processes do), so on a CPU each replica is an instance of its own.

Feedback without running everything: a share ``sample_rate`` of samples, drawn uniformly before any exit is known,
keeps running to the final layer after its answer was sent. Only those *traced* samples are reported, with every
exit's confidence and the original model's prediction, so the controller's window is a uniform sample of the traffic
and its accuracy estimate is unbiased without weights; it fills ``1 / sample_rate`` times slower than in latency mode.
So that the plan's thresholds are checked on served traffic soon after a (re)deployment, each replica first traces
every one of its first ``warmup_traced`` samples (``early_exit.tracing``).

Every request gets exactly one response: its answer, or an error when a block model fails, times out or is unloaded,
or when more than ``max_in_flight`` requests are already in flight (back-pressure instead of unbounded queues).

Off the request path, a ``PlanFollower`` keeps the block models, and the router's own workers, sized as the plan in
force in Redis says: the controller re-sizes them when the exit rates drift.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from early_exit.e3_plan import PLAN_FILE, VERDICT_OUTPUTS, BlockGroup, E3Plan, tensor_name
from early_exit.errors import ConfigError, EarlyExitError
from early_exit.exit_config import ExitConfig
from early_exit.exit_rule import NEVER_EXIT, exits_at
from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.manifest import Manifest, load_manifest
from early_exit.tracing import WARMUP_TRACED, TraceSampler
from triton_backend.block_group import BlockGroupRunner, MergingWorkers
from triton_backend.config_watcher import ConfigWatcher
from triton_backend.feedback_publisher import FeedbackPublisher
from triton_backend.metrics import BackendMetrics
from triton_backend.plan_follower import PlanFollower, reload_model
from triton_backend.responses import BatchAnswers
from triton_backend.stub import configure_logging, model_device, model_parameters, model_redis, replica_id

LOGGER = logging.getLogger("triton_backend.e3_router")


class HopError(RuntimeError):
    """A block model answered with an error (or not at all)."""


_Trace = tuple[np.ndarray, np.ndarray, int, int, float]  # ramp confidences, ramp predictions, final, exit, answer ms


@dataclass
class _Traces:
    """Traced samples gathered into feedback records of up to ``size`` samples under one configuration version.

    A record closes when it is full, older than ``max_age`` seconds, or the configuration changes; the router also
    drains it whenever no request is in flight, so feedback never waits for traffic that may not come.
    """

    size: int = 32
    max_age: float = 1.0
    version: int = -1
    started: float = 0.0
    rows: list[_Trace] = field(default_factory=list)

    def add(self, version: int, trace: _Trace) -> list[tuple[int, list[_Trace]]]:
        """Add one sample; returns the records it closed."""
        closed = self.drain() if self.rows and self.version != version else []
        if not self.rows:
            self.version, self.started = version, time.monotonic()
        self.rows.append(trace)
        if len(self.rows) >= self.size or time.monotonic() - self.started >= self.max_age:
            closed += self.drain()
        return closed

    def drain(self) -> list[tuple[int, list[_Trace]]]:
        rows, self.rows = self.rows, []
        return [(self.version, rows)] if rows else []


def _reloaded_by_another_instance(name: str, config: str) -> None:
    """The block-model reload of router instances other than the first: it reloads them once for all."""


class TritonPythonModel:
    """Triton entry points for the router instance of an E3 entry."""

    def initialize(self, args: dict[str, str]) -> None:
        configure_logging(LOGGER)
        model_config = json.loads(args["model_config"])
        parameters = model_parameters(model_config)
        self.name = args["model_name"]
        self.replica = replica_id()
        version_dir = Path(args["model_repository"]) / args["model_version"]
        try:
            self.plan = E3Plan.from_json((version_dir / PLAN_FILE).read_text(encoding="utf-8"))
            source_dir = Path(args["model_repository"]).parent / self.plan.source / parameters.get("source_version",
                                                                                                    "1")
            self.manifest: Manifest = load_manifest(source_dir)
            self.plan.validate(self.manifest)
            first = self.plan.groups[0]
            self.first = BlockGroupRunner(source_dir, model_device(args), first.first_block, first.last_block,
                                          first.ramp)
        except (OSError, EarlyExitError, IndexError) as exc:
            raise pb_utils.TritonModelException(f"{self.name}: cannot load its plan: {exc}") from exc
        self._use_threads(self.plan.threads)
        # The first group's replicas are spread over the router's instances (on a CPU, one process per replica).
        self.instances = max(1, sum(int(group.get("count", 1)) for group in model_config.get("instance_group", [{}])))
        self.workers = MergingWorkers(self.first.run, self.first.inputs[0], self._workers(first.replicas),
                                      max(self.plan.max_batch_size, 2 * first.batch_size), f"{self.name}-first")
        self.blocks = self.plan.block_models(self.name)
        self.max_in_flight = int(parameters.get("max_in_flight", "256"))
        self.hop_timeout_us = int(float(parameters.get("hop_timeout_ms", "0")) * 1000)
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        # Every sample of the first ``warmup_traced`` (this replica's, shared out over its instances) is traced, so
        # the controller checks the plan's thresholds on served traffic soon after a (re)deployment.
        warmup = int(parameters.get("warmup_traced", str(WARMUP_TRACED)))
        self.sampler = TraceSampler(self.plan.sample_rate, -(-warmup // self.instances))
        self.traces = _Traces()
        self.metrics = BackendMetrics(pb_utils, self.name, self.manifest.final_exit + 1)

        client, keys, where = model_redis(self.name, parameters)
        initial = ExitConfig(self.name, 0, dict(self.plan.thresholds), writer="plan", written_at=0.0)
        self.metrics.config_applied(0)
        self.watcher = ConfigWatcher(client, keys, len(self.manifest.ramps), initial,
                                     poll_interval=float(parameters.get("config_poll_seconds", "1.0")),
                                     before_swap=self._check_exits,
                                     on_applied=lambda config: self.metrics.config_applied(config.version),
                                     on_rejected=self.metrics.config_rejected)
        # The controller sees this entry as its own model: the source's ramps and profile, with the exits fixed by
        # the plan (moving one means re-planning the block models).
        registered = replace(self.manifest, name=self.name, initial_thresholds=dict(self.plan.thresholds),
                             exits_fixed=True)
        self.publisher = FeedbackPublisher(client, keys, registered.to_json(),
                                           on_published=self.metrics.feedback_published,
                                           on_dropped=self.metrics.feedback_dropped)
        # Every instance re-sizes its own workers; one (Triton names them <model>_<group>_<index>) reloads the
        # block models.
        reloads = args["model_instance_name"].endswith("_0_0")
        self.follower = PlanFollower(client, keys, self.name, self.plan, self.manifest.classes,
                                     load_model=reload_model if reloads else _reloaded_by_another_instance,
                                     resize_first=self._resize_first,
                                     poll_interval=float(parameters.get("plan_poll_seconds", "2.0")),
                                     on_applied=self.metrics.plan_applied, on_failed=self.metrics.plan_failed)
        LOGGER.info("%s: first group (blocks %d-%d) in %d workers on %s, then block models %s; exits %s, every one "
                    "of this instance's first %d samples traced to the end, then %.0f%%; Redis %s", self.name,
                    first.first_block, first.last_block, self._workers(first.replicas), self.first.model.device,
                    self.blocks, self.plan.exits, self.sampler.warmup_left, 100 * self.plan.sample_rate, where)

    def _use_threads(self, threads: int) -> None:
        """On a CPU, each call of the first group gets ``threads`` torch threads (worker threads take torch's thread
        count on their first parallel call, so a re-sizing applies to the new workers it starts)."""
        if self.plan.instance_kind == "KIND_CPU" and threads > 0:
            torch.set_num_threads(threads)

    def _workers(self, replicas: int) -> int:
        """This instance's share of the first group's replicas."""
        return max(1, -(-replicas // self.instances))

    def _resize_first(self, replicas: int, threads: int) -> None:
        """Apply a re-sized plan to the first group (called by the plan follower's thread)."""
        self._use_threads(threads)
        self.workers.resize(self._workers(replicas))

    def _check_exits(self, config: ExitConfig) -> None:
        outside = sorted(set(config.active_ramps) - set(self.plan.exits))
        if outside:
            raise ConfigError(f"ramps {outside} are not exits of this E3 plan (exits {self.plan.exits}); "
                              "moving exits takes a new plan")

    async def execute(self, requests: list[Any]) -> None:
        admitted = []
        for request in requests:
            if self.in_flight >= self.max_in_flight:
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"{self.name}: overloaded, {self.in_flight} requests in flight; retry later")),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.in_flight += 1
            admitted.append(request)
        if admitted:
            task = asyncio.get_running_loop().create_task(self._route(admitted))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None

    async def _route(self, requests: list[Any]) -> None:
        """Run this batch's samples through the block groups: all of them through the first, then after each exit only
        the undecided and the traced ones; each request is answered as soon as its samples are decided."""
        started = time.perf_counter()
        config = self.watcher.current  # one snapshot per batch
        manifest = self.manifest
        batch: BatchAnswers | None = None
        try:
            arrays = {spec.name: [pb_utils.get_input_tensor_by_name(request, spec.name).as_numpy()
                                  for request in requests] for spec in manifest.inputs}
            batch = BatchAnswers(requests, [a.shape[0] for a in arrays[manifest.inputs[0].name]], manifest.classes,
                                 manifest.final_exit, started)
            values = {name: np.concatenate(parts) for name, parts in arrays.items()}
            n = len(batch.exit)
            ramp_confidence = np.zeros((len(self.plan.exits), n), dtype=np.float32)
            ramp_prediction = np.zeros((len(self.plan.exits), n), dtype=np.int32)
            final = np.zeros(n, dtype=np.int32)
            traced = self.sampler.draw(n)
            alive = np.arange(n)  # samples still computing; every array in ``values`` is indexed like it
            for position, group in enumerate(self.plan.groups):
                if not alive.size:
                    break
                if position == 0:
                    outputs = await self.workers.run(values)
                else:
                    outputs = await self._hop(self.blocks[position - 1], group, values)
                confidence, label = outputs["CONFIDENCE"][:, 0], outputs["LABEL"][:, 0]
                if group.ramp is None:
                    exiting, exit_index = batch.undecided[alive], manifest.final_exit
                    final[alive] = label
                else:
                    ramp_confidence[position, alive], ramp_prediction[position, alive] = confidence, label
                    threshold = config.thresholds.get(group.ramp, NEVER_EXIT)
                    exiting, exit_index = batch.undecided[alive] & exits_at(confidence, threshold), group.ramp
                if exiting.any():
                    batch.answer(alive[exiting], exit_index, outputs["PROBS"][exiting], label[exiting],
                                 confidence[exiting])
                keep = batch.undecided[alive] | traced[alive]
                alive = alive[keep]
                values.update((spec.name, outputs[spec.name]) for spec in group.outputs)
                values = {name: array[keep] for name, array in values.items()}
            self.metrics.count_exits(np.bincount(batch.exit, minlength=manifest.final_exit + 1))
            for row in np.flatnonzero(traced):
                self._publish(self.traces.add(config.version, (ramp_confidence[:, row], ramp_prediction[:, row],
                                                                int(final[row]), int(batch.exit[row]),
                                                                float(batch.answer_ms[row]))))
        except Exception as exc:  # noqa: BLE001 - every request gets exactly one answer, whatever broke
            LOGGER.warning("%s: batch of %d requests failed: %s", self.name, len(requests), exc)
            batch = batch or BatchAnswers(requests, [0] * len(requests), manifest.classes, manifest.final_exit, started)
            batch.fail_unsent(f"{self.name}: {exc}")
        finally:
            self.in_flight -= len(requests)
            if not self.in_flight:
                self._publish(self.traces.drain())

    async def _hop(self, model: str, group: BlockGroup, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one block model on the rows still computing; its carried values and its exit's verdict."""
        inputs = [pb_utils.Tensor(tensor_name(spec.name), np.ascontiguousarray(values[spec.name]))
                  for spec in group.inputs]
        wanted = [*(spec.name for spec in group.outputs), *VERDICT_OUTPUTS] if group.ramp is not None \
            else list(VERDICT_OUTPUTS)
        names = [tensor_name(name) if name not in VERDICT_OUTPUTS else name for name in wanted]
        options: dict[str, Any] = {"timeout": self.hop_timeout_us} if self.hop_timeout_us else {}
        request = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=names, **options)
        response = await request.async_exec()
        if response.has_error():
            raise HopError(f"{model}: {response.error().message()}")
        outputs = {}
        for name, tensor in zip(wanted, names):
            output = pb_utils.get_output_tensor_by_name(response, tensor)
            if output is None:
                raise HopError(f"{model} did not return {tensor}")
            outputs[name] = output.as_numpy()
        return outputs

    def _publish(self, records: list[tuple[int, list[_Trace]]]) -> None:
        for version, rows in records:
            times = np.asarray([row[4] for row in rows], dtype=np.float32)
            self.publisher.offer(FeedbackRecord(
                self.name, version, self.plan.exits,
                np.stack([row[0] for row in rows], axis=1), np.stack([row[1] for row in rows], axis=1),
                np.asarray([row[2] for row in rows], dtype=np.int32), np.asarray([row[3] for row in rows],
                                                                                dtype=np.int16),
                # A router has no batch: these timings describe answers only; E3 entries are never judged on them.
                BatchTiming(float(times.max()), 0.0, 0.0, times),
                replica=self.replica,
            ))

    def finalize(self) -> None:
        self.follower.close()
        self.workers.close()
        self.watcher.close()
        self.publisher.close()
        self.metrics.close()
