import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# Property-based: every document a writer could get wrong is rejected with ConfigError, never another exception.

VALID = {"schema_version": 1, "model": "m", "version": 3, "ramps": [{"id": 0, "threshold": 0.9}, {"id": 2,
         "threshold": 1.0}], "writer": "w", "written_at": 1.0}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
NUM_RAMPS = 3
# The CPU is shared with Triton and training jobs in CI: judge generated inputs, not how fast they are drawn.
SHARED_CPU = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accepted(text: str | bytes) -> bool:
    """The backend's check: parse, then validate against a model with ``NUM_RAMPS`` ramps."""
    try:
        ExitConfig.from_json(text).validate(NUM_RAMPS)
    except ConfigError:
        return False
    return True


@st.composite
def malformed_documents(draw: st.DrawFn) -> str:
    """A valid document with one thing wrong: a field missing or of the wrong JSON type, a ramp id unknown or
    repeated, a threshold outside [0, 1], a negative version, an unsupported schema."""
    document = copy.deepcopy(VALID)
    ramp = document["ramps"][draw(st.integers(0, 1))]
    wrong_type = {
        "model": st.integers() | st.none() | st.lists(st.text()),
        "version": st.floats() | st.text() | st.booleans() | st.none(),
        "schema_version": st.floats() | st.text() | st.booleans(),
        "ramps": st.dictionaries(st.text(), JSON_VALUES) | st.text() | st.integers(),
        "writer": st.integers() | st.lists(st.text(), min_size=1),
        "written_at": st.text() | st.booleans(),
    }
    kind = draw(st.sampled_from(["missing", "type", "ramp_id", "ramp_repeat", "threshold", "version",
                                 "schema", "ramp_entry", "top_level"]))
    if kind == "missing":
        del document[draw(st.sampled_from(["model", "version", "ramps", "schema_version"]))]
    elif kind == "type":
        name = draw(st.sampled_from(sorted(wrong_type)))
        document[name] = draw(wrong_type[name].filter(lambda v: not isinstance(v, list) or name != "ramps"))
    elif kind == "ramp_id":
        ramp["id"] = draw(st.integers().filter(lambda i: not 0 <= i < NUM_RAMPS) | st.floats() | st.text()
                          | st.booleans() | st.none())
    elif kind == "ramp_repeat":
        document["ramps"].append(dict(ramp))
    elif kind == "threshold":
        ramp["threshold"] = draw(st.floats().filter(lambda t: not 0.0 <= t <= 1.0) | st.text() | st.booleans()
                                 | st.none() | st.lists(st.floats(0, 1), min_size=1))
    elif kind == "version":
        document["version"] = draw(st.integers(max_value=-1))
    elif kind == "schema":
        document["schema_version"] = draw(st.integers().filter(lambda v: v != 1))
    elif kind == "ramp_entry":
        document["ramps"][0] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
    else:
        return json.dumps(draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict))))
    return json.dumps(document)


def test_the_reference_document_is_accepted() -> None:
    assert _accepted(json.dumps(VALID))


@SHARED_CPU
@given(malformed_documents())
def test_every_malformed_document_is_rejected(text: str) -> None:
    assert not _accepted(text)


@SHARED_CPU
@given(st.binary(max_size=200) | st.text(max_size=200) | JSON_VALUES.map(json.dumps))
def test_arbitrary_input_is_accepted_or_raises_config_error_only(raw: str | bytes) -> None:
    _accepted(raw)  # any exception other than ConfigError fails the test


@SHARED_CPU
@given(st.integers(0, 10), st.integers(1, 10**6))
def test_deeply_nested_and_huge_documents_raise_config_error(depth_thousands: int, version_digits: int) -> None:
    assert not _accepted("[" * (1000 * depth_thousands + 1) + "]" * (1000 * depth_thousands + 1))
    assert not _accepted(json.dumps({**VALID, "version": float(f"1e{version_digits}")}))
