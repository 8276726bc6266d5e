import json
import math

import pytest

from early_exit.errors import ConfigError
from early_exit.exit_config import ExitConfig


def test_round_trip_keeps_thresholds_and_version() -> None:
    config = ExitConfig("m", 3, {2: 0.9, 0: 1.0})
    parsed = ExitConfig.from_json(config.to_json())
    assert parsed.version == 3 and parsed.thresholds == {0: 1.0, 2: 0.9} and parsed.active_ramps == (0, 2)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [({0: math.nan}, "not a number"), ({5: 0.5}, "unknown ramp"), ({0: 1.5}, "not a number"), ({-1: 0.5}, "unknown")],
)
def test_validate_rejects_bad_thresholds(thresholds: dict[int, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExitConfig("m", 1, thresholds).validate(num_ramps=3)


@pytest.mark.parametrize(
    "text",
    ["not json", "{}", json.dumps({"schema_version": 1, "model": "m", "version": "x", "ramps": []}),
     json.dumps({"schema_version": 1, "model": "m", "version": 1, "ramps": [{"id": 0, "threshold": 0.5}] * 2})],
)
def test_from_json_rejects_malformed_documents(text: str) -> None:
    with pytest.raises(ConfigError):
        ExitConfig.from_json(text)
