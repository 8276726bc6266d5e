"""Request path of the ``apparate`` backend: batch in → blocks and ramps → early sends → feedback → final answers.

The model is non-decoupled with dynamic batching: every request gets exactly one response. A request whose samples all
exit at ramps is answered through its response sender with ``TRITONSERVER_RESPONSE_COMPLETE_FINAL`` the moment the
last of them is decided; the others are answered by ``execute``'s return value, which leaves in one message instead of
a round trip per response (``None`` in the slots of requests already answered). A *traced* batch runs to the end, so
the original model's prediction for every sample is known and becomes label-free accuracy feedback; the record also
carries what the batch cost (wall time, early-exit overhead, when each sample was answered, idle time before it), so
the controller can check that exits really save time.

Which batches are traced: the ``feedback_share`` parameter (default 1: all of them, the paper's design). Below 1, each
batch is traced with that probability, drawn before any exit is known, and only traced batches are reported, so the
controller's window stays a uniform sample of the traffic. An untraced batch stops at the ramp where its last sample
exits: the deeper blocks would only have produced feedback, and on a CPU they cost as much as they did for the whole
batch. Its last answers then leave with ``execute``'s return value instead of a blocking send, and the instance is
free for the next batch at once.

A traced batch whose every sample exits stops there too: its answers leave with ``execute``'s return value and the
rest of its pass goes to the ``TailRunner``, which computes it while the instance has no batch to serve and then
publishes the record. Only when the runner has fallen behind does the pass finish inline, as it used to.

A *full* batch (``max_batch_size`` samples) holds its early answers too: they leave with ``execute``'s return value.
The batcher fills a batch only while requests queue faster than the instance serves them, and then every early
``send``, one blocking round trip each, delays the whole queue behind the batch for one request's gain. Measured on
the ResNet-56 reference at saturation (batches of 31 on average, two thirds of the samples exiting at static's
thresholds): the early-exit work took 12.6 % of the batches' time with early sends and 3.1 % with the answers held,
and saturated capacity against vanilla went from -8.6 % to -2.1 % (median of 8 rotating rounds each). Below a full
batch the early answers go out as they are decided.

A small share of the traced batches (``control_share``, default 5 %) is served while exits are on as if they were
off: the fused graph, every sample answered at the final layer. These *control* batches are the live baseline the
controller measures savings against. A batch's own timings cannot give it: running the model as segments with ramps
between them costs more under load than the ramp heads the backend can time (measured on ResNet-20 at 25 % load: a
ramp that never exits added 0.62 ms per request to Triton's compute time against 0.15 ms profiled), so savings
computed from the exiting batches alone looked positive while the entry was slower than its vanilla twin.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from early_exit.errors import EarlyExitError
from early_exit.exit_config import ExitConfig
from early_exit.exit_rule import exits_at
from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.runtime import EarlyExitModel, Verdict
from triton_backend.config_watcher import ConfigWatcher
from triton_backend.feedback_publisher import FeedbackPublisher
from triton_backend.metrics import BackendMetrics
from triton_backend.responses import BatchAnswers
from triton_backend.stub import configure_logging, model_device, model_parameters, model_redis, replica_id, share_cores
from triton_backend.tail_runner import TailRunner

LOGGER = logging.getLogger("triton_backend")


def _answer(batch: BatchAnswers, samples: np.ndarray, verdict: Verdict, hold: bool = False) -> int:
    """Answer ``samples`` with ``verdict``: only their probability rows leave the model's device. Returns the number
    of requests this answered completely."""
    rows = verdict.probs[torch.from_numpy(samples).to(verdict.probs.device)].cpu().numpy()
    return batch.answer(samples, verdict.exit, rows, verdict.prediction[samples], verdict.confidence[samples],
                        hold=hold)


class TritonPythonModel:
    """Triton entry points for one model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        configure_logging(LOGGER)
        model_config = json.loads(args["model_config"])
        parameters = model_parameters(model_config)
        share_cores(parameters)
        self.name = args["model_name"]
        self.replica = replica_id()
        device = model_device(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        try:
            self.model = EarlyExitModel(version_dir, device)
        except EarlyExitError as exc:
            raise pb_utils.TritonModelException(f"{self.name}: cannot load {version_dir}: {exc}") from exc
        manifest = self.model.manifest
        self.input_names = [spec.name for spec in manifest.inputs]
        # Parameters are checked before any metric family exists: a refused (re)load must not create and then drop
        # families that the instance still serving shares by name.
        self.feedback_share = _share(self.name, parameters, "feedback_share", 1.0)
        self.control_share = _share(self.name, parameters, "control_share", 0.05, allow_zero=True)
        self.max_batch_size = int(model_config.get("max_batch_size", 0))
        self.metrics = BackendMetrics(pb_utils, self.name, manifest.final_exit + 1)
        self.rng = np.random.default_rng()

        client, keys, where = model_redis(self.name, parameters)
        initial = ExitConfig(self.name, 0, dict(manifest.initial_thresholds), writer="manifest", written_at=0.0)
        self.model.plan(initial.active_ramps)
        self.model.plan(())  # the fused graph, for control batches and exits switched off
        self._last_end = 0.0
        # Waits and busy time of batches since the last record that sent none: the next record carries them.
        self._unreported_idle_ms = self._unreported_busy_ms = 0.0
        self.metrics.config_applied(0)
        self.watcher = ConfigWatcher(
            client,
            keys,
            len(manifest.ramps),
            initial,
            poll_interval=float(parameters.get("config_poll_seconds", "1.0")),
            before_swap=lambda config: self.model.plan(config.active_ramps),
            on_applied=lambda config: self.metrics.config_applied(config.version),
            on_rejected=self.metrics.config_rejected,
        )
        self.publisher: FeedbackPublisher | None = None
        self.tails: TailRunner | None = None
        # A vanilla model has nothing to learn from. An early-exit one reports with every exit off too: its batch
        # timings tell the controller the load, which decides whether exits switched off for not paying are tried again.
        if manifest.ramps:
            self.publisher = FeedbackPublisher(
                client,
                keys,
                manifest.to_json(),
                on_published=self.metrics.feedback_published,
                on_dropped=self.metrics.feedback_dropped,
            )
            self.tails = TailRunner(self.name, on_failed=lambda error: self.metrics.feedback_dropped(1))
        LOGGER.info("%s: loaded %d blocks, %d candidate ramps on %s; %.0f %% of batches traced to the end; Redis %s",
                    self.name, len(manifest.blocks), len(manifest.ramps), device, 100 * self.feedback_share, where)

    def execute(self, requests: list[Any]) -> list[Any | None]:
        if self.tails is None:
            return self._execute(requests)
        with self.tails.serving():
            return self._execute(requests)

    def _execute(self, requests: list[Any]) -> list[Any | None]:
        started = time.perf_counter()
        idle_ms = 1000.0 * (started - self._last_end) if self._last_end else 0.0
        config = self.watcher.current  # one snapshot per batch: a swap never splits a batch
        manifest = self.model.manifest
        inputs = {
            name: [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for request in requests]
            for name in self.input_names
        }
        sizes = [array.shape[0] for array in inputs[self.input_names[0]]]
        batch = BatchAnswers(requests, sizes, manifest.classes, manifest.final_exit, started)
        tensors = {name: torch.from_numpy(np.concatenate(arrays)) for name, arrays in inputs.items()}
        traced = self.publisher is not None and (self.feedback_share >= 1.0 or self.rng.random() < self.feedback_share)
        if traced and config.active_ramps and self.rng.random() < self.control_share:
            config = replace(config, thresholds={})
            self.metrics.batch_controlled()
        values: dict[str, torch.Tensor] = {}
        full = 0 < self.max_batch_size <= sum(sizes)  # requests are queueing: early sends would delay them all
        try:
            run_started = time.perf_counter()
            ramp_verdicts, final, overhead_ms = self._run(batch, tensors, config, to_end=False, values=values,
                                                          hold=full)
            blocks_ms = 1000.0 * (time.perf_counter() - run_started) - overhead_ms  # the model's own blocks
        except Exception as exc:  # answer every request, whatever broke; Triton keeps serving
            self._isolate(batch, inputs, config, exc)
            self._end_unreported(started, idle_ms)
            return batch.take_held()
        batch.stamp_held()  # held answers leave with the return value, now
        self.metrics.count_exits(np.bincount(batch.exit, minlength=manifest.final_exit + 1))
        if not traced:
            if final is None:
                self.metrics.batch_stopped()
            self._end_unreported(started, idle_ms)
            return batch.take_held()
        ended = time.perf_counter()
        timing = BatchTiming(1000.0 * (ended - started), overhead_ms, idle_ms + self._unreported_idle_ms,
                             batch.answer_ms, self._unreported_busy_ms)
        self._unreported_idle_ms = self._unreported_busy_ms = 0.0
        self._last_end = ended
        if final is not None:
            self._publish(config, ramp_verdicts, final, batch.exit, timing)
        else:  # every sample exited: the rest of the pass only yields feedback, computed when nothing waits for it
            tail = self._finish(values, ramp_verdicts, config, batch.exit, timing, blocks_ms)
            if self.tails.submit(tail):
                self.metrics.batch_deferred()
            else:  # the runner has fallen behind: answer now, then finish here (busy time the next record carries)
                self.metrics.batch_finished_inline()
                batch.send_held()
                with torch.inference_mode():
                    for _ in tail:
                        pass
                self._last_end = time.perf_counter()
                self._unreported_busy_ms += 1000.0 * (self._last_end - ended)
        return batch.take_held()

    def _publish(self, config: ExitConfig, ramp_verdicts: list[Verdict], final: Verdict, exits: np.ndarray,
                 timing: BatchTiming) -> None:
        n = len(final.prediction)
        confidence = np.stack([v.confidence for v in ramp_verdicts]) if ramp_verdicts else np.zeros((0, n))
        prediction = np.stack([v.prediction for v in ramp_verdicts]) if ramp_verdicts else np.zeros((0, n))
        self.publisher.offer(FeedbackRecord(self.name, config.version, config.active_ramps, confidence, prediction,
                                            final.prediction, exits, timing, replica=self.replica))

    def _finish(self, values: dict[str, torch.Tensor], ramp_verdicts: list[Verdict], config: ExitConfig,
                exits: np.ndarray, timing: BatchTiming, blocks_ms: float) -> Iterator[None]:
        """The rest of a traced pass that stopped at the ramp of ``ramp_verdicts[-1]``, one block per step, then its
        record. The record's ``tail_ms`` is what those blocks would have added to the batch had it run them inline:
        their profiled time, scaled by how fast the batch's own blocks ran (``blocks_ms``) against their profile."""
        stopped_at = ramp_verdicts[-1].exit
        verdicts = list(ramp_verdicts)
        for verdict in self.model.finish(values, stopped_at, config.active_ramps):
            if verdict is not None and verdict.exit == self.model.manifest.final_exit:
                tail_ms = self._tail_ms(stopped_at, len(exits), blocks_ms)
                self._publish(config, verdicts, verdict, exits, replace(timing, tail_ms=tail_ms))
            elif verdict is not None:
                verdicts.append(verdict)
            yield None

    def _tail_ms(self, stopped_at: int, batch_size: int, head_ms: float) -> float:
        """Time the blocks after ramp ``stopped_at`` would have taken inline, judged by the ``head_ms`` the blocks
        before it took (0 without a profile). Not measured on the runner: it runs single-threaded and yields its core
        to everything else, so its own clock says nothing about the serving thread's speed."""
        profile = self.model.manifest.profile
        if profile is None:
            return 0.0
        blocks, _ = profile.at(batch_size)
        cut = self.model.manifest.ramps[stopped_at].after_block + 1
        profiled_head = float(blocks[:cut].sum())
        return float(blocks[cut:].sum()) * (head_ms / profiled_head if profiled_head > 0 else 1.0)

    def _end_unreported(self, started: float, idle_ms: float) -> None:
        """A batch that sent no record ended: its wait and busy time go with the next record."""
        self._last_end = time.perf_counter()
        self._unreported_idle_ms += idle_ms
        self._unreported_busy_ms += 1000.0 * (self._last_end - started)

    def _run(self, batch: BatchAnswers, tensors: dict[str, torch.Tensor], config: ExitConfig, to_end: bool = True,
             values: dict[str, torch.Tensor] | None = None,
             hold: bool = False) -> tuple[list[Verdict], Verdict | None, float]:
        """Run ``batch`` through the active ramps, answering samples as they are decided (held for ``execute``'s
        return value with ``hold``, else sent at once); to the end when ``to_end``, else only until every sample is
        decided (the activations then stay in ``values`` for ``EarlyExitModel.finish``). Returns the ramps' verdicts,
        the final verdict (``None`` when the batch stopped at a ramp) and the early-exit overhead in ms (work a
        vanilla model does not do)."""
        manifest = self.model.manifest
        ramp_verdicts: list[Verdict] = []
        final: Verdict | None = None
        overhead_ms = 0.0
        with torch.inference_mode():
            for verdict in self.model.stages(tensors, config.active_ramps, values):
                if verdict.exit == manifest.final_exit:
                    final = verdict
                    samples = np.flatnonzero(batch.undecided)
                    if samples.size:
                        _answer(batch, samples, verdict, hold=True)
                    continue
                decided = time.perf_counter()
                ramp_verdicts.append(verdict)
                exiting = batch.undecided & exits_at(verdict.confidence, config.thresholds[verdict.exit])
                samples = np.flatnonzero(exiting)
                stop = not to_end and not (batch.undecided & ~exiting).any()
                if samples.size:  # the last answers leave with execute's return value, as do all of a held batch
                    answered = _answer(batch, samples, verdict, hold=hold or stop)
                    if hold and not stop:
                        self.metrics.answers_held(answered)
                overhead_ms += verdict.cost_ms + 1000.0 * (time.perf_counter() - decided)
                if stop:
                    break
        return ramp_verdicts, final, overhead_ms

    def _isolate(self, batch: BatchAnswers, inputs: dict[str, list[np.ndarray]], config: ExitConfig,
                 error: Exception) -> None:
        """The batch failed: run each request it had not answered on its own, so that a request whose data broke it
        (a token id the embedding does not have, say) fails alone and the others are answered. This costs one pass
        per request, only after a failure; those passes publish no feedback."""
        if len(batch.requests) == 1:
            LOGGER.warning("%s: request failed: %r", self.name, error)
            batch.fail_unsent(f"{self.name}: inference failed: {error}")
            return
        unanswered = np.flatnonzero(~batch.sent)
        LOGGER.warning("%s: batch of %d failed (%r); running its %d unanswered requests one by one", self.name,
                       len(batch.requests), error, len(unanswered))
        for index in unanswered:
            alone = batch.split(int(index))
            try:
                self._run(alone, {name: torch.from_numpy(arrays[index]) for name, arrays in inputs.items()}, config)
                alone.send_held()
            except Exception as exc:  # this request's own failure: its error goes to its client only
                alone.fail_unsent(f"{self.name}: inference failed: {exc}")

    def finalize(self) -> None:
        if self.tails is not None:
            self.tails.close()
        self.watcher.close()
        if self.publisher is not None:
            self.publisher.close()
        self.metrics.close()


def _share(model: str, parameters: dict[str, str], name: str, default: float, allow_zero: bool = False) -> float:
    """Share parameter ``name`` (``feedback_share``, ``control_share``): a number in (0, 1], or [0, 1] with
    ``allow_zero``."""
    text = parameters.get(name, "") or str(default)
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0.0 <= share <= 1.0 or (share == 0.0 and not allow_zero):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise pb_utils.TritonModelException(f"{model}: parameter {name} must be in {interval}, got {text!r}")
    return share
