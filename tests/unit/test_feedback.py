import numpy as np
import pytest

from early_exit.errors import FeedbackError
from early_exit.feedback import FeedbackRecord


def test_encode_decode_round_trip() -> None:
    record = FeedbackRecord(
        model="m",
        config_version=4,
        ramps=(1, 3),
        confidence=np.array([[0.5, 0.9, 0.1], [0.7, 0.8, 0.99]], dtype=np.float32),
        prediction=np.array([[1, 2, 3], [4, 5, 6]]),
        final=np.array([1, 5, 6]),
        exit=np.array([9, 1, 3]),
    )
    fields = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in record.encode().items()}
    decoded = FeedbackRecord.decode(fields)
    assert decoded.ramps == (1, 3) and decoded.config_version == 4 and decoded.batch_size == 3
    np.testing.assert_array_equal(decoded.confidence, record.confidence)
    np.testing.assert_array_equal(decoded.prediction, record.prediction)
    np.testing.assert_array_equal(decoded.exit, record.exit)


def test_decode_rejects_truncated_arrays() -> None:
    fields = {b"schema": b"1", b"batch_size": b"4", b"ramps": b"0", b"model": b"m", b"config_version": b"1",
              b"confidence": b"\x00" * 3, b"prediction": b"", b"final": b"", b"exit": b"", b"timestamp": b"0"}
    with pytest.raises(FeedbackError):
        FeedbackRecord.decode(fields)
