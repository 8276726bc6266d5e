"""Request path of the ``apparate_llm`` backend: a causal LM served as a decoupled (streaming) Triton model, with
per-token early exits (``early_exit.llm_decoding``) or, without exits, as the vanilla twin.

The interface is that of Triton's vLLM backend: ``text_input`` (BYTES), optional ``stream`` (BOOL),
``sampling_parameters`` (BYTES, JSON: ``max_tokens``; ``temperature`` must be 0, greedy decoding being the only mode)
and ``exclude_input_in_output`` (BOOL); out come ``text_output`` (BYTES) and, per token, ``EXIT`` (INT32, the decoder
layer that produced it; the number of layers = the final layer), ``CONFIDENCE`` (FP32, top-1 minus top-2
probability) and ``TOKEN_IDS`` (INT64). With ``stream`` true every token is its own response (the last one carries
the final flag); otherwise one response holds the whole text. Sampling parameters may also come as the request's
parameters (the HTTP ``generate`` endpoint's ``"parameters"``).

``execute`` only parses requests and hands them to one decoding thread, which also loads the model: every torch
operation of the instance runs on that thread (``_decode`` says why). It batches continuously: every pass takes
one step of each active request (up to parameter ``max_rows``, default 8; later ones wait), their tokens sharing the
matrix multiplications while each request keeps its own KV cache (``Decoder.step_many``); new requests join at the
next pass, finished ones leave. Before every pass each request is checked for cancellation (a cancelled request stops
and frees its cache). Responses go out as tokens are decided. Parameters: see ``triton_backend.llm_setup``.

Feedback: while the entry follows Redis (``hot_reload``), a share (``feedback_sample``) of its exit-eligible tokens
is observed at every active ramp and against the original model's token (``early_exit.llm_decoding``); every
``feedback_tokens`` of them (or after a second) go out as one ``FeedbackRecord`` through the ``FeedbackPublisher``,
which also registers the entry's manifest (``llm_setup.llm_manifest``: per-token costs of a layer, the LM head and a
ramp, measured at load unless given) so the controller discovers it and tunes its thresholds.

Metrics: ``apparate_llm_tokens_total{model,exit}`` (tokens streamed per exit layer),
``apparate_llm_exit_verdicts_total{model,verdict}`` (exited tokens the deep pass agreed or disagreed with),
``apparate_config_version`` and ``apparate_config_rejections_total`` (hot-reloaded exit configurations).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from early_exit.exit_config import ExitConfig
from early_exit.llm_decoding import Decoder, DecodeStats, Observation, Row, Token
from triton_backend.config_watcher import ConfigWatcher
from triton_backend.feedback_publisher import FeedbackPublisher
from triton_backend.llm_setup import (
    LLMSettings,
    RequestError,
    TokenCosts,
    llm_feedback_record,
    llm_manifest,
    load_llm,
    max_tokens_of,
    measure_costs,
)
from triton_backend.stub import configure_logging, model_parameters, model_redis, replica_id, share_cores

LOGGER = logging.getLogger("triton_backend.llm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class _Job:
    """One request being served."""

    request: Any
    sender: Any
    row: Row
    stream: bool
    prefix: str
    sent_chars: int = 0
    counted: DecodeStats = field(default_factory=DecodeStats)


def _input(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    """Triton entry points for one model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        configure_logging(LOGGER)
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException(f"{args['model_name']}: apparate_llm needs "
                                                "model_transaction_policy { decoupled: true }")
        parameters = model_parameters(model_config)
        self.name = args["model_name"]
        try:
            self.settings = LLMSettings.from_parameters(parameters)
        except Exception as exc:
            raise pb_utils.TritonModelException(f"{self.name}: cannot load: {exc!r}") from exc
        self._incoming: queue.Queue[_Job] = queue.Queue()
        self._stopping = threading.Event()
        self._serving = threading.Event()  # set once initialize has wired metrics, watcher and publisher
        loaded: Future[Any] = Future()
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self._thread = threading.Thread(target=self._decode, args=(parameters, version_dir, loaded),
                                        name=f"decode-{self.name}", daemon=True)
        self._thread.start()
        try:
            self._wire(parameters, loaded)
        except BaseException:
            self._stopping.set()
            raise
        finally:
            self._serving.set()  # the decoding thread serves, or stops when wiring failed
        LOGGER.info("%s: %s, %d layers, exits %s, mode %s, at most %d exits in a row", self.name,
                    self.settings.model, self.num_layers, self.settings.exits or "none (vanilla)",
                    "faithful" if self.settings.faithful else "stream", self.settings.max_consecutive)

    def _wire(self, parameters: dict[str, str], loaded: Future[Any]) -> None:
        """Metrics, and the Redis side (exit configurations in, feedback out), once the decoding thread loaded the
        model. A failure fails the load; ``initialize`` then stops the thread."""
        try:
            manifest = loaded.result()
        except Exception as exc:
            raise pb_utils.TritonModelException(f"{self.name}: cannot load: {exc!r}") from exc
        self.num_layers = self.decoder.num_layers
        self.max_rows = max(1, int(parameters.get("max_rows", "8") or 8))
        self._policy = self.settings.policy
        family = pb_utils.MetricFamily
        labels = {"model": self.name}
        self._families = [
            family("apparate_llm_tokens_total", "Generated tokens per exit layer (last = final layer)", family.COUNTER),
            family("apparate_llm_exit_verdicts_total", "Exited tokens the deep pass agreed or disagreed with",
                   family.COUNTER),
            family("apparate_config_version", "Exit configuration version in use", family.GAUGE),
            family("apparate_config_rejections_total", "Exit configurations rejected as invalid or stale",
                   family.COUNTER),
        ]
        tokens, verdicts, version, rejections = self._families
        self._token_metrics = {layer: tokens.Metric(labels={**labels, "exit": str(layer)})
                               for layer in range(1, self.num_layers + 1)}
        self._verdict_metrics = {v: verdicts.Metric(labels={**labels, "verdict": v}) for v in ("agree", "disagree")}
        self._version_metric = version.Metric(labels=labels)
        self._rejection_metric = rejections.Metric(labels=labels)
        self._version_metric.set(0)
        self.watcher: ConfigWatcher | None = None
        self.publisher: FeedbackPublisher | None = None
        self._pending: dict[tuple[tuple[int, ...], int], tuple[float, list[Observation], list[float]]] = {}
        self._replica = replica_id()
        if self.settings.hot_reload:
            client, keys, where = model_redis(self.name, parameters)
            initial = ExitConfig(self.name, 0, {layer - 1: t for layer, t in self.settings.exits.items()},
                                 writer="parameters", written_at=0.0)
            self.watcher = ConfigWatcher(
                client, keys, self.num_layers - 1, initial,
                poll_interval=float(parameters.get("config_poll_seconds", "1.0")),
                before_swap=self._apply, on_applied=lambda c: self._version_metric.set(c.version),
                on_rejected=lambda: self._rejection_metric.increment(1))
            if manifest is not None:
                self.publisher = FeedbackPublisher(client, keys, manifest.to_json())
                self.decoder.observe = self.settings.feedback_sample
            LOGGER.info("%s: exit thresholds follow Redis %s; feedback on %.0f %% of exit-eligible tokens", self.name,
                        where, 100 * self.settings.feedback_sample if self.publisher else 0.0)

    def _manifest(self, parameters: dict[str, str], model: Any) -> Any:
        """The manifest the controller discovers this entry by; per-token costs from parameters, else measured."""
        costs = TokenCosts.from_parameters(parameters) or measure_costs(model, self.decoder.ramp_head)
        LOGGER.info("%s: per token %.3f ms per decoder layer, %.3f ms for the LM head, %.3f ms per ramp (%d tokens)",
                    self.name, costs.layer_ms, costs.head_ms, costs.ramp_ms, self.decoder.ramp_head.size)
        device = str(model.embed_tokens.weight.device)
        return llm_manifest(self.name, model.config.num_layers, model.config.vocab_size, self.settings.exits, costs,
                            device)

    def _apply(self, config: ExitConfig) -> None:
        """Build the policy of a new exit configuration (ConfigWatcher's before_swap: a bad one is rejected)."""
        policy = self.settings.policy_for({ramp + 1: t for ramp, t in config.thresholds.items()}, config.version)
        policy.validate(self.num_layers)
        self._policy = policy

    # --- request intake ----------------------------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._incoming.put(self._job(request, sender))
            except Exception as exc:  # a bad request fails alone, at once
                message = str(exc) if isinstance(exc, (RequestError, ValueError)) else repr(exc)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {message}")),
                            flags=FINAL)
        return None

    def _job(self, request: Any, sender: Any) -> _Job:
        prompt = _input(request, "text_input")
        if prompt is None:
            raise RequestError("text_input is required")
        prompt = _text(prompt)
        stream = bool(_input(request, "stream") or False)
        exclude = _input(request, "exclude_input_in_output")
        prepend = (not stream) if exclude is None else not bool(exclude)
        if prepend and stream:
            raise RequestError("when streaming, exclude_input_in_output must be true (or absent)")
        sampling = _input(request, "sampling_parameters")
        if sampling is None:
            sampling = json.loads(request.parameters() or "{}")
        max_tokens = max_tokens_of(sampling)
        row = self.decoder.start(self.tokenizer.encode(prompt), max_tokens, self.tokenizer.eos_token_id)
        return _Job(request, sender, row, stream, prompt if prepend else "")

    # --- the decoding thread ------------------------------------------------------------------------------------

    def _decode(self, parameters: dict[str, str], version_dir: Path, loaded: Future[Any]) -> None:
        """The decoding thread. Every torch operation of the instance runs here, loading and cost measurement
        included, and none on the stub's main thread: GNU OpenMP keeps one worker pool per thread that starts
        parallel regions, and once two pools exist on a machine with few cores, each parallel region waits for its
        sleeping workers to wake (measured on 2 cores: 0.12 instead of 0.03 ms for a 576 x 1,536 matrix-vector
        product, 57 instead of 32 ms per SmolLM2 token). ``loaded`` gets the manifest to publish (``None`` without
        feedback) or the loading error."""
        try:
            share_cores(parameters)  # the thread count is per thread: set it where the work runs
            model, self.tokenizer = load_llm(self.settings.model, version_dir)
            self.decoder = Decoder(model, self.settings.policy, ramp_head=self.settings.ramp_head(model, version_dir))
            feedback = self.settings.hot_reload and self.settings.feedback_sample > 0
            loaded.set_result(self._manifest(parameters, model) if feedback else None)
        except Exception as exc:
            loaded.set_exception(exc)
            return
        self._serving.wait()
        if not self._stopping.is_set():
            self._loop()

    def _loop(self) -> None:
        active: list[_Job] = []
        while not self._stopping.is_set():
            try:
                if not active:
                    active.append(self._incoming.get(timeout=0.1))
                while len(active) < self.max_rows:
                    active.append(self._incoming.get_nowait())
            except queue.Empty:
                pass
            active = [job for job in active if not self._cancel_if_asked(job)]
            if active:
                active = self._advance(active)
            self._publish()
        for job in active + list(self._incoming.queue):  # unloading: nobody is left waiting
            self._fail(job, "the model is being unloaded")
        self._publish(everything=True)

    # --- feedback -----------------------------------------------------------------------------------------------

    def _collect(self, row: Row, pass_ms: float) -> None:
        """Take ``row``'s completed observations into the record being gathered for their ramps and version."""
        observations, row.observations = row.observations, []
        if self.publisher is None:
            return
        for observation in observations:
            key = (observation.ramps, observation.version)
            since, gathered, times = self._pending.setdefault(key, (time.monotonic(), [], []))
            gathered.append(observation)
            times.append(pass_ms)

    def _publish(self, everything: bool = False) -> None:
        """Offer the records that are full (``feedback_tokens``) or whose oldest token waited a second."""
        if self.publisher is None or not self._pending:
            return
        now = time.monotonic()
        for key, (since, gathered, times) in list(self._pending.items()):
            if everything or len(gathered) >= self.settings.feedback_tokens or now - since >= 1.0:
                del self._pending[key]
                try:
                    self.publisher.offer(llm_feedback_record(self.name, gathered, self.num_layers, times,
                                                             self._replica))
                except Exception:  # feedback never breaks serving
                    LOGGER.exception("%s: cannot build a feedback record", self.name)

    def _cancel_if_asked(self, job: _Job) -> bool:
        cancelled = False
        with contextlib.suppress(Exception):
            cancelled = bool(job.request.is_cancelled())
        if not cancelled:
            with contextlib.suppress(Exception):
                cancelled = bool(job.sender.is_cancelled())
        if cancelled:
            LOGGER.info("%s: request cancelled after %d tokens; its cache is freed", self.name,
                        len(job.row.streamed))
            job.row.release()
            job.row.finished = True
            with contextlib.suppress(Exception):
                job.sender.send(flags=FINAL)
        return cancelled

    def _advance(self, jobs: list[_Job]) -> list[_Job]:
        """One pass over every active request (continuous batching); returns those still active."""
        started = time.perf_counter()
        try:
            results = self.decoder.step_many([job.row for job in jobs], self._policy)
        except Exception as exc:  # the pass broke mid-way: its rows' caches are unusable, fail them, keep serving
            LOGGER.exception("%s: a pass over %d requests failed", self.name, len(jobs))
            for job in jobs:
                job.row.release()
                self._fail(job, f"generation failed: {exc!r}")
            return []
        still = []
        for job, tokens in zip(jobs, results):
            try:
                self._respond(job, tokens)
                if job.row.finished:  # after the last token went out: the check of the last exits is off its path
                    self.decoder.settle(job.row)
                self._count(job, tokens)
                self._collect(job.row, 1000 * (time.perf_counter() - started))
            except Exception as exc:  # this request fails alone
                LOGGER.exception("%s: request failed", self.name)
                job.row.release()
                self._fail(job, f"generation failed: {exc!r}")
                continue
            if not job.row.finished:
                still.append(job)
                continue
            stats = job.row.stats
            LOGGER.info("%s: %d tokens streamed, %d ramp exits taken; %d exits checked by the deep pass, %d agreed",
                        self.name, len(job.row.streamed), stats.exited, stats.agreed + stats.disagreed, stats.agreed)
        return still

    def _fail(self, job: _Job, message: str) -> None:
        with contextlib.suppress(Exception):
            job.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {message}")),
                            flags=FINAL)

    def _count(self, job: _Job, tokens: list[Token]) -> None:
        for token in tokens:
            self._token_metrics[token.exit].increment(1)
        stats, counted = job.row.stats, job.counted
        if stats.agreed > counted.agreed:
            self._verdict_metrics["agree"].increment(stats.agreed - counted.agreed)
        if stats.disagreed > counted.disagreed:
            self._verdict_metrics["disagree"].increment(stats.disagreed - counted.disagreed)
        job.counted = DecodeStats(stats.exited, stats.agreed, stats.disagreed)

    def _new_text(self, job: _Job, upto: int, final: bool) -> str:
        """Text of the tokens streamed up to ``upto`` not sent yet (held back while it ends in half a character)."""
        text = self.tokenizer.decode([t.id for t in job.row.streamed[:upto]])
        if not final and text.endswith("\ufffd"):
            return ""
        delta, job.sent_chars = text[job.sent_chars:], len(text)
        return delta

    def _respond(self, job: _Job, tokens: list[Token]) -> None:
        row = job.row
        if job.stream:
            first = len(row.streamed) - len(tokens)
            for index, token in enumerate(tokens):
                last = row.finished and index == len(tokens) - 1
                text = self._new_text(job, first + index + 1, last)
                job.sender.send(self._response(text, [token]), flags=FINAL if last else 0)
            if row.finished and not tokens:
                job.sender.send(flags=FINAL)
        elif row.finished:
            text = job.prefix + self.tokenizer.decode([t.id for t in row.streamed])
            job.sender.send(self._response(text, row.streamed), flags=FINAL)

    @staticmethod
    def _response(text: str, tokens: list[Token]) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("EXIT", np.array([t.exit for t in tokens], dtype=np.int32)),
            pb_utils.Tensor("CONFIDENCE", np.array([t.confidence for t in tokens], dtype=np.float32)),
            pb_utils.Tensor("TOKEN_IDS", np.array([t.id for t in tokens], dtype=np.int64)),
        ])

    def finalize(self) -> None:
        self._stopping.set()
        self._thread.join(10.0)
        if self.publisher is not None:
            self.publisher.close()
        if self.watcher is not None:
            self.watcher.close()
