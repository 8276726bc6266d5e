import os
import socket

import numpy as np
import pytest

from early_exit.errors import FeedbackError
from early_exit.feedback import BatchTiming, FeedbackRecord
from triton_backend.stub import REPLICA_ID_ENV, replica_id


def test_encode_decode_round_trip() -> None:
    record = FeedbackRecord(
        model="m",
        config_version=4,
        ramps=(1, 3),
        confidence=np.array([[0.5, 0.9, 0.1], [0.7, 0.8, 0.99]], dtype=np.float32),
        prediction=np.array([[1, 2, 3], [4, 5, 6]]),
        final=np.array([1, 5, 6]),
        exit=np.array([9, 1, 3]),
        timing=BatchTiming(batch_ms=5.0, overhead_ms=0.5, idle_ms=2.0, answer_ms=np.array([4.9, 1.0, 3.0]),
                           unreported_ms=7.5, tail_ms=3.25),
        replica="triton-7d9f-x2x",
    )
    fields = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in record.encode().items()}
    decoded = FeedbackRecord.decode(fields)
    assert decoded.ramps == (1, 3) and decoded.config_version == 4 and decoded.batch_size == 3
    assert decoded.replica == "triton-7d9f-x2x" and decoded.timestamp == record.timestamp
    np.testing.assert_array_equal(decoded.confidence, record.confidence)
    np.testing.assert_array_equal(decoded.prediction, record.prediction)
    np.testing.assert_array_equal(decoded.exit, record.exit)
    assert (decoded.timing.batch_ms, decoded.timing.overhead_ms, decoded.timing.idle_ms) == (5.0, 0.5, 2.0)
    assert (decoded.timing.unreported_ms, decoded.timing.tail_ms) == (7.5, 3.25)
    np.testing.assert_allclose(decoded.timing.answer_ms, record.timing.answer_ms, rtol=1e-6)


def test_token_ids_beyond_int16_survive() -> None:
    record = FeedbackRecord("m", 1, (0,), np.ones((1, 2), np.float32), np.array([[40000, 49151]]),
                            np.array([49151, 7]), np.array([0, 1]), BatchTiming(1.0, 0.0, 0.0, np.zeros(2)))
    fields = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in record.encode().items()}
    decoded = FeedbackRecord.decode(fields)
    assert decoded.prediction.tolist() == [[40000, 49151]] and decoded.final.tolist() == [49151, 7]


def test_decode_rejects_truncated_arrays() -> None:
    fields = {b"schema": b"2", b"batch_size": b"4", b"ramps": b"0", b"model": b"m", b"config_version": b"1",
              b"confidence": b"\x00" * 3, b"prediction": b"", b"final": b"", b"exit": b"", b"timestamp": b"0"}
    with pytest.raises(FeedbackError):
        FeedbackRecord.decode(fields)


def _fields(record: FeedbackRecord) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in record.encode().items()}


def test_a_record_of_an_older_backend_without_a_replica_still_decodes() -> None:
    record = FeedbackRecord("m", 1, (0,), np.ones((1, 2), np.float32), np.array([[1, 2]]), np.array([1, 2]),
                            np.array([0, 1]), BatchTiming(1.0, 0.0, 0.0, np.zeros(2)), replica="r")
    fields = _fields(record)
    del fields[b"replica"]  # what a backend from before replica ids writes, under the same schema version
    del fields[b"unreported_ms"]  # nor did it count batches without a record
    del fields[b"tail_ms"]  # nor finish batches off the request path
    decoded = FeedbackRecord.decode(fields)
    assert decoded.replica == "" and decoded.final.tolist() == [1, 2]
    assert decoded.timing.unreported_ms == 0.0 and decoded.timing.tail_ms == 0.0
    assert FeedbackRecord("m", 1, (), np.ones((0, 1)), np.ones((0, 1)), np.array([1]), np.array([0]),
                          BatchTiming(1.0, 0.0, 0.0, np.zeros(1))).replica == ""


def test_the_replica_id_is_the_environment_s_else_host_and_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REPLICA_ID_ENV, "triton-5c7b9d-abcde")  # the pod name, from the downward API
    assert replica_id() == "triton-5c7b9d-abcde"
    monkeypatch.setenv(REPLICA_ID_ENV, "")
    assert replica_id() == f"{socket.gethostname()}:{os.getpid()}"
    monkeypatch.delenv(REPLICA_ID_ENV)
    assert replica_id() == f"{socket.gethostname()}:{os.getpid()}"
