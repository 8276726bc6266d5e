"""Answers of one batch of requests: which request owns which samples, what each sample was answered, and each
request's single final response, sent the moment all of its samples are decided.

Both serving modes answer this way (latency mode per executed batch, the E3 router per batch it routes): Triton's
non-decoupled contract is exactly one response per request, flagged ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``; a second
send raises.

Two ways out, because they cost differently: a response sender's ``send`` is one blocking round trip to Triton's
process per response (the stub waits until Triton has taken it), about as long as a small CNN's forward pass on a CPU;
responses *returned* from ``execute`` leave together in one message after it returns. So an early answer is sent at
once (its latency is the point), while answers decided at the end of the batch are held and returned, and the batch's
remaining requests do not wait behind one round trip each. Python backend 24.10 takes a returned list with ``None``
for the requests already answered through their senders. The round trip of an early answer is taken by a
:class:`Courier` thread (``send`` releases the GIL while it waits), so the rest of the batch computes on meanwhile
instead of stalling ~2 ms per early answer (measured on 2 loaded cores).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

LOGGER = logging.getLogger("triton_backend")


class Courier:
    """Sends responses through their response senders on a thread of its own, in the order they are posted.

    A sender's ``send`` blocks until Triton's process has taken the response; on the request path that stall would
    delay every sample still computing in the batch, and the batches queued behind it. :meth:`drain` lets a batch
    that returns its other responses from ``execute`` send them only after its early answers, which therefore
    never arrive later than the answers of the batch's deeper samples."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name=f"courier-{name}", daemon=True)
        self._thread.start()

    def post(self, sender: Any, response: Any) -> None:
        """Send ``response`` as the one final response of ``sender``'s request, as soon as the thread gets to it."""
        self._queue.put((sender, response))

    def drain(self) -> None:
        """Wait until every response posted so far has been sent (or has failed)."""
        self._queue.join()

    def close(self, timeout: float = 5.0) -> None:
        """Send what was posted, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            sender, response = item
            try:
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # noqa: BLE001 - one request's failure must not reach the others
                self.failed += 1
                LOGGER.exception("a response could not be sent (%d such failures so far)", self.failed)
            finally:
                self._queue.task_done()


class BatchAnswers:
    """Args:
    requests: the batch's requests, in order.
    sizes: samples per request.
    classes: width of the ``PROBS`` output.
    final_exit: exit index of the original model's last layer (reported until a sample is answered elsewhere).
    started: ``time.perf_counter()`` when the batch started; ``answer_ms`` counts from there (to when a response
        was posted or held).
    courier: sends the responses that are not held.
    senders: the requests' response senders (default: taken from the requests; each request has one owner).
    """

    def __init__(self, requests: list[Any], sizes: list[int], classes: int, final_exit: int, started: float,
                 courier: Courier, senders: list[Any] | None = None) -> None:
        self.started = started
        self.courier = courier
        self.requests = requests
        self.final_exit = final_exit
        self.senders = senders if senders is not None else [request.get_response_sender() for request in requests]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.owner = np.repeat(np.arange(len(requests)), sizes)
        self.pending = np.asarray(sizes, dtype=int)
        self.sent = np.zeros(len(requests), dtype=bool)
        n = int(self.bounds[-1])
        self.undecided = np.ones(n, dtype=bool)
        self.probs = np.zeros((n, classes), dtype=np.float32)
        self.label = np.zeros(n, dtype=np.int64)
        self.confidence = np.zeros(n, dtype=np.float32)
        self.exit = np.full(n, final_exit, dtype=np.int32)
        self.answer_ms = np.zeros(n, dtype=np.float32)
        self.held: list[Any | None] = [None] * len(requests)

    def answer(self, samples: np.ndarray, exit_index: int, probs: np.ndarray, label: np.ndarray,
               confidence: np.ndarray, hold: bool = False) -> None:
        """Record the answers of ``samples`` (``probs``, ``label`` and ``confidence`` are their rows, in the same
        order) and send every request whose samples are now all decided; with ``hold``, keep their responses for
        :meth:`take_held` instead (the caller returns them from ``execute`` right after)."""
        self.probs[samples] = probs
        self.label[samples] = label
        self.confidence[samples] = confidence
        self.exit[samples] = exit_index
        self.undecided[samples] = False
        self.pending -= np.bincount(self.owner[samples], minlength=len(self.requests))
        for index in np.flatnonzero((self.pending == 0) & ~self.sent):
            index = int(index)
            if hold:
                self._hold(index)
            else:
                self._deliver(index, lambda index=index: self._response(index))
            lo, hi = self.bounds[index], self.bounds[index + 1]
            self.answer_ms[lo:hi] = 1000.0 * (time.perf_counter() - self.started)

    def take_held(self) -> list[Any | None]:
        """The held responses, one slot per request (``None`` for requests answered otherwise): ``execute``'s return
        value, once the early answers have left. The batch holds nothing afterwards."""
        self.courier.drain()
        held, self.held = self.held, [None] * len(self.requests)
        return held

    def send_held(self) -> None:
        """Send the held responses through the requests' senders (for a batch whose ``execute`` returns elsewhere)."""
        for index, response in enumerate(self.take_held()):
            if response is not None:
                self.courier.post(self.senders[index], response)

    def split(self, index: int) -> BatchAnswers:
        """Hand request ``index`` over to a batch of its own (to run it alone); this batch no longer answers it."""
        lo, hi = self.bounds[index], self.bounds[index + 1]
        alone = BatchAnswers([self.requests[index]], [int(hi - lo)], self.probs.shape[1], self.final_exit,
                             self.started, self.courier, senders=[self.senders[index]])
        self.sent[index] = True
        return alone

    def _response(self, index: int) -> Any:
        lo, hi = self.bounds[index], self.bounds[index + 1]
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("PROBS", self.probs[lo:hi]),
                pb_utils.Tensor("LABEL", self.label[lo:hi, None]),
                pb_utils.Tensor("EXIT", self.exit[lo:hi, None]),
                pb_utils.Tensor("CONFIDENCE", self.confidence[lo:hi, None]),
            ]
        )

    def _hold(self, index: int) -> None:
        self.sent[index] = True
        self.held[index] = self._build(index, lambda: self._response(index))

    def fail_unsent(self, message: str) -> None:
        for index in np.flatnonzero(~self.sent):
            self._deliver(int(index), lambda: pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))

    def _deliver(self, index: int, response: Callable[[], Any]) -> None:
        """Post request ``index`` its one final response. The request counts as answered from here on, since a
        second send to it would raise."""
        self.sent[index] = True
        self.courier.post(self.senders[index], self._build(index, response))

    def _build(self, index: int, response: Callable[[], Any]) -> Any:
        """``response()``, or an error response when it cannot be built: each request is answered on its own, and
        one that fails never fails another request of the batch, decided or not."""
        try:
            return response()
        except Exception as exc:  # noqa: BLE001 - one request's failure must not reach the others
            LOGGER.exception("response to request %d of a batch of %d could not be built", index, len(self.requests))
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"response could not be built: {exc}"))
