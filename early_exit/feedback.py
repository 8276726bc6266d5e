"""Per-batch feedback record: the one owner of its Redis Stream encoding.

For every batch the backend records, for each *active* ramp, every sample's confidence and prediction, plus the
original model's final prediction and the exit each sample took. Because the batch always runs to the end, the final
prediction is the label-free ground truth the controller tunes against. The record also carries what the batch
really cost on the server, so the controller can compare the saving it models with the saving it gets: the batch's
wall time, the part of it spent on early-exit work (ramps, early sends) that a vanilla model would not do, when each
sample was answered, and how long the instance sat idle before the batch (its utilisation). Arrays travel as raw
little-endian bytes (float32 confidences and times, int32 predictions, so token ids of a large vocabulary fit).

Each record names the replica that served the batch (``replica``: the pod on Kubernetes, else host and process), so
the controller of many Triton replicas can tell whose feedback its window holds. The field is optional on the wire:
records of older backends, which lack it, decode with an empty replica, so adding it kept the schema version. So
do ``unreported_ms`` (busy time of batches that sent no record) and ``tail_ms`` (blocks run off the request path),
0 when absent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from early_exit.errors import FeedbackError

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class BatchTiming:
    """Server-side cost of one batch, in milliseconds.

    Args:
        batch_ms: from the start of ``execute`` to the last response sent.
        overhead_ms: the part of ``batch_ms`` spent on work a vanilla model does not do (ramp heads, their
            verdicts, sending early answers).
        idle_ms: time the instance waited before this batch since the previous record's batch ended: the wait before
            this batch, plus those before batches in between that published no record.
        answer_ms: ``[batch]`` when each sample's response was sent, from the start of ``execute``.
        unreported_ms: time the instance spent, since the previous record, on batches that published none (with
            sampled feedback, the batches not traced to the end). Without it the controller would judge the
            instance's utilisation from traced batches alone, which run longer than the ones that stop early.
        tail_ms: for a batch whose every sample exited and whose deeper blocks then ran off the request path (while
            the instance had nothing to serve), what those blocks would have added to ``batch_ms`` inline: the time
            its samples' exits saved beyond ``batch_ms``. Not busy time: it delayed no request.
    """

    batch_ms: float
    overhead_ms: float
    idle_ms: float
    answer_ms: np.ndarray
    unreported_ms: float = 0.0
    tail_ms: float = 0.0


@dataclass(frozen=True)
class FeedbackRecord:
    """Observations of one executed batch.

    Args:
        model: Triton model name.
        config_version: exit configuration the batch ran under.
        ramps: active ramp ids, in model order (rows of ``confidence`` and ``prediction``).
        confidence: float32 ``[len(ramps), batch]`` max softmax probability per ramp and sample.
        prediction: int32 ``[len(ramps), batch]`` argmax class per ramp and sample.
        final: int32 ``[batch]`` original model's argmax.
        exit: int16 ``[batch]`` ramp id that answered, or the model's ``final_exit`` index.
        timing: what the batch cost on the server.
        timestamp: UNIX time the batch finished.
        replica: the serving replica (``triton_backend.stub.replica_id``); ``""`` when unknown (an older backend).
    """

    model: str
    config_version: int
    ramps: tuple[int, ...]
    confidence: np.ndarray
    prediction: np.ndarray
    final: np.ndarray
    exit: np.ndarray
    timing: BatchTiming
    timestamp: float = field(default_factory=time.time)
    replica: str = ""

    @property
    def batch_size(self) -> int:
        return int(self.final.shape[0])

    def encode(self) -> dict[str, bytes | str | int | float]:
        """Fields for ``XADD``."""
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "config_version": self.config_version,
            "batch_size": self.batch_size,
            "ramps": ",".join(str(r) for r in self.ramps),
            "confidence": np.ascontiguousarray(self.confidence, dtype="<f4").tobytes(),
            "prediction": np.ascontiguousarray(self.prediction, dtype="<i4").tobytes(),
            "final": np.ascontiguousarray(self.final, dtype="<i4").tobytes(),
            "exit": np.ascontiguousarray(self.exit, dtype="<i2").tobytes(),
            "batch_ms": self.timing.batch_ms,
            "overhead_ms": self.timing.overhead_ms,
            "idle_ms": self.timing.idle_ms,
            "answer_ms": np.ascontiguousarray(self.timing.answer_ms, dtype="<f4").tobytes(),
            "unreported_ms": self.timing.unreported_ms,
            "tail_ms": self.timing.tail_ms,
            "timestamp": self.timestamp,
            "replica": self.replica,
        }

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> FeedbackRecord:
        """Inverse of ``encode`` for the raw (bytes) mapping ``XREADGROUP`` returns."""
        try:
            schema = int(fields[b"schema"])
            if schema != SCHEMA_VERSION:
                raise FeedbackError(f"feedback schema {schema} is not supported (expected {SCHEMA_VERSION})")
            batch = int(fields[b"batch_size"])
            ramps = tuple(int(r) for r in fields[b"ramps"].decode().split(",") if r)
            shape = (len(ramps), batch)
            return cls(
                model=fields[b"model"].decode(),
                config_version=int(fields[b"config_version"]),
                ramps=ramps,
                confidence=np.frombuffer(fields[b"confidence"], dtype="<f4").reshape(shape),
                prediction=np.frombuffer(fields[b"prediction"], dtype="<i4").reshape(shape),
                final=np.frombuffer(fields[b"final"], dtype="<i4").reshape(batch),
                exit=np.frombuffer(fields[b"exit"], dtype="<i2").reshape(batch),
                timing=BatchTiming(
                    batch_ms=float(fields[b"batch_ms"]),
                    overhead_ms=float(fields[b"overhead_ms"]),
                    idle_ms=float(fields[b"idle_ms"]),
                    answer_ms=np.frombuffer(fields[b"answer_ms"], dtype="<f4").reshape(batch),
                    unreported_ms=float(fields.get(b"unreported_ms", 0.0)),
                    tail_ms=float(fields.get(b"tail_ms", 0.0)),
                ),
                timestamp=float(fields[b"timestamp"]),
                replica=fields.get(b"replica", b"").decode(),
            )
        except FeedbackError:
            raise
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise FeedbackError(f"malformed feedback record: {exc!r}") from exc
