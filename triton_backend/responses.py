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
for the requests already answered through their senders.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

LOGGER = logging.getLogger("triton_backend")


class BatchAnswers:
    """Args:
    requests: the batch's requests, in order.
    sizes: samples per request.
    classes: width of the ``PROBS`` output.
    final_exit: exit index of the original model's last layer (reported until a sample is answered elsewhere).
    started: ``time.perf_counter()`` when the batch started; ``answer_ms`` counts from there.
    senders: the requests' response senders (default: taken from the requests; each request has one owner).
    """

    def __init__(self, requests: list[Any], sizes: list[int], classes: int, final_exit: int, started: float,
                 senders: list[Any] | None = None) -> None:
        self.started = started
        self.requests = requests
        self.final_exit = final_exit
        self.senders = senders if senders is not None else [request.get_response_sender() for request in requests]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.owner = np.repeat(np.arange(len(requests)), sizes)
        self.pending = np.asarray(sizes, dtype=int)
        self.sent = np.zeros(len(requests), dtype=bool)
        self.failed_sends = 0
        n = int(self.bounds[-1])
        self.undecided = np.ones(n, dtype=bool)
        self.probs = np.zeros((n, classes), dtype=np.float32)
        self.label = np.zeros(n, dtype=np.int64)
        self.confidence = np.zeros(n, dtype=np.float32)
        self.exit = np.full(n, final_exit, dtype=np.int32)
        self.answer_ms = np.zeros(n, dtype=np.float32)
        self.held: list[Any | None] = [None] * len(requests)

    def answer(self, samples: np.ndarray, exit_index: int, probs: np.ndarray, label: np.ndarray,
               confidence: np.ndarray, hold: bool = False) -> int:
        """Record the answers of ``samples`` (``probs``, ``label`` and ``confidence`` are their rows, in the same
        order) and send every request whose samples are now all decided; with ``hold``, keep their responses for
        :meth:`take_held` instead (the caller returns them from ``execute``). Returns how many requests that was."""
        self.probs[samples] = probs
        self.label[samples] = label
        self.confidence[samples] = confidence
        self.exit[samples] = exit_index
        self.undecided[samples] = False
        self.pending -= np.bincount(self.owner[samples], minlength=len(self.requests))
        complete = np.flatnonzero((self.pending == 0) & ~self.sent)
        for index in complete:
            index = int(index)
            if hold:  # stamped when it leaves (``stamp_held``)
                self._hold(index)
                continue
            self._deliver(index, lambda index=index: self._response(index))
            lo, hi = self.bounds[index], self.bounds[index + 1]
            self.answer_ms[lo:hi] = 1000.0 * (time.perf_counter() - self.started)
        return len(complete)

    def stamp_held(self) -> None:
        """Set the answer time of every held response's samples to now: they leave with ``execute``'s return value,
        not when they were decided."""
        held = np.array([response is not None for response in self.held])
        self.answer_ms[held[self.owner]] = 1000.0 * (time.perf_counter() - self.started)

    def take_held(self) -> list[Any | None]:
        """The held responses, one slot per request (``None`` for requests answered otherwise): ``execute``'s return
        value. The batch holds nothing afterwards."""
        held, self.held = self.held, [None] * len(self.requests)
        return held

    def send_held(self) -> None:
        """Send the held responses through the requests' senders (for a batch whose ``execute`` returns elsewhere)."""
        for index, response in enumerate(self.take_held()):
            if response is not None:
                self._deliver(index, lambda response=response: response)

    def split(self, index: int) -> BatchAnswers:
        """Hand request ``index`` over to a batch of its own (to run it alone); this batch no longer answers it."""
        lo, hi = self.bounds[index], self.bounds[index + 1]
        alone = BatchAnswers([self.requests[index]], [int(hi - lo)], self.probs.shape[1], self.final_exit,
                             self.started, senders=[self.senders[index]])
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
        try:
            self.held[index] = self._response(index)
        except Exception:  # noqa: BLE001 - one request's failure must not reach the others; it gets an error
            self.failed_sends += 1
            LOGGER.exception("response to request %d of a batch of %d could not be built", index, len(self.requests))
            self.held[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError("response could not be built"))

    def fail_unsent(self, message: str) -> None:
        for index in np.flatnonzero(~self.sent):
            self._deliver(int(index), lambda: pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))

    def _deliver(self, index: int, response: Callable[[], Any]) -> None:
        """Send request ``index`` its one final response. Each request is answered on its own: a response that cannot
        be built or sent is logged and counted (``failed_sends``) and never fails another request of the batch,
        decided or not. The request counts as answered either way, since a second send to it would raise."""
        self.sent[index] = True
        try:
            self.senders[index].send(response(), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - one request's failure must not reach the others
            self.failed_sends += 1
            LOGGER.exception("response to request %d of a batch of %d could not be sent (%d such failures in this "
                             "batch)", index, len(self.requests), self.failed_sends)
