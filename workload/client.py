"""Open-loop request replay with plain ``tritonclient`` gRPC calls, timing each answer on the client side."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient

OUTPUTS = ("PROBS", "LABEL", "EXIT", "CONFIDENCE")


@dataclass
class Answer:
    """One request's outcome; times are ``time.perf_counter`` seconds."""

    index: int
    sent: float
    done: float = float("nan")
    label: int = -1
    exit: int = -1
    confidence: float = float("nan")
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return 1000.0 * (self.done - self.sent)


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival offsets (s) of a Poisson process with ``rate`` requests per second."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=count))


def bursty_arrivals(count: int, rate: float, burst: int = 16, seed: int = 0) -> np.ndarray:
    """Bursts of ``burst`` simultaneous requests whose starts form a Poisson process of the same mean rate."""
    starts = poisson_arrivals(-(-count // burst), rate / burst, seed)
    return np.repeat(starts, burst)[:count]


def replay(
    url: str,
    model: str,
    inputs: dict[str, np.ndarray],
    arrivals: Sequence[float],
    outputs: Sequence[str] = OUTPUTS,
    timeout: float = 120.0,
    answers: list[Answer] | None = None,
) -> list[Answer]:
    """Send request ``i`` (sample ``i`` of every input) at ``arrivals[i]`` and wait for every answer.

    Args:
        answers: list to append to as requests go out (lets a caller watch progress live).
    """
    client = grpcclient.InferenceServerClient(url)
    answers = [] if answers is None else answers
    remaining = threading.Semaphore(0)
    count = len(arrivals)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs]

    def callback(answer: Answer, result: grpcclient.InferResult | None, error: Exception | None) -> None:
        answer.done = time.perf_counter()
        if error is not None:
            answer.error = str(error)
        else:
            answer.label = int(result.as_numpy("LABEL").reshape(-1)[0])
            if "EXIT" in outputs:
                answer.exit = int(result.as_numpy("EXIT").reshape(-1)[0])
                answer.confidence = float(result.as_numpy("CONFIDENCE").reshape(-1)[0])
        remaining.release()

    start = time.perf_counter()
    for i in range(count):
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        request_inputs = []
        for name, array in inputs.items():
            sample = array[i : i + 1]
            tensor = grpcclient.InferInput(name, list(sample.shape), _triton_dtype(sample.dtype))
            tensor.set_data_from_numpy(sample)
            request_inputs.append(tensor)
        answer = Answer(i, time.perf_counter())
        answers.append(answer)
        client.async_infer(
            model, request_inputs, lambda result, error, a=answer: callback(a, result, error), outputs=requested
        )
    deadline = time.perf_counter() + timeout
    for _ in range(count):
        if not remaining.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            raise TimeoutError(f"{model}: answers missing after {timeout}s")
    client.close()
    return answers


def measure_capacity(url: str, model: str, inputs: dict[str, np.ndarray]) -> float:
    """Requests answered without error per second when the client sends them all at once (saturation); refusals
    (an overloaded E3 router answers at once) count as time spent, not as answers."""
    answers = replay(url, model, inputs, np.zeros(len(next(iter(inputs.values())))), outputs=("LABEL",))
    served = sum(a.error is None for a in answers)
    return served / (max(a.done for a in answers) - min(a.sent for a in answers))


def compute_seconds(url: str, model: str) -> float:
    """Seconds ``model``'s instances have spent computing since it loaded (Triton's compute input + infer + output):
    the busy time a utilisation is measured from."""
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    inference = stats["model_stats"][0]["inference_stats"]
    phases = ("compute_input", "compute_infer", "compute_output")
    return sum(int(inference.get(phase, {}).get("ns", 0)) for phase in phases) / 1e9


def service_ms(url: str, model: str, inputs: dict[str, np.ndarray]) -> float:
    """Server time per request (``compute_seconds``) with one request in flight at a time: an idle server's
    service time, so ``load / service`` is the arrival rate at which the server is busy a ``load`` share of the time
    when requests do not queue behind each other."""
    count = len(next(iter(inputs.values())))
    before = compute_seconds(url, model)
    for i in range(count):
        replay(url, model, {name: array[i : i + 1] for name, array in inputs.items()}, [0.0], outputs=("LABEL",))
    return 1000.0 * (compute_seconds(url, model) - before) / count


def _triton_dtype(dtype: np.dtype) -> str:
    return {"uint8": "UINT8", "int64": "INT64", "int32": "INT32", "float32": "FP32", "object": "BYTES"}[str(dtype)]
