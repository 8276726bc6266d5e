"""Exit configuration: which ramps are active and at which confidence threshold. Owner of its JSON format.

Every writer (the controller, tools, operators' scripts) stores it through ``controller.config_store``, whose
compare-and-set keeps ``version`` strictly increasing and one version one document; the backend validates it against
its manifest and swaps it in between batches. What a threshold means is ``early_exit.exit_rule``'s to say; a threshold
of ``NEVER_EXIT`` keeps a ramp reporting feedback without ever answering.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from early_exit.errors import ConfigError
from early_exit.exit_rule import NEVER_EXIT

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ExitConfig:
    """A versioned set of active ramps and their thresholds.

    Args:
        model: Triton model name it applies to.
        version: strictly increasing; the backend ignores anything not newer than what it runs.
        thresholds: active ramp id -> confidence threshold in [0, 1]; ramps not listed are inactive (not computed).
        writer: who produced it (for logs and audits).
        written_at: UNIX time of writing.
    """

    model: str
    version: int
    thresholds: dict[int, float]
    writer: str = "controller"
    written_at: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    @property
    def active_ramps(self) -> tuple[int, ...]:
        """Active ramp ids in model order (ids follow depth)."""
        return tuple(sorted(self.thresholds))

    def validate(self, num_ramps: int) -> None:
        """Check against a model with ``num_ramps`` candidate ramps; raises ``ConfigError`` naming the field."""
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(f"schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        if self.version < 0:
            raise ConfigError(f"version must be >= 0, got {self.version}")
        for ramp_id, threshold in self.thresholds.items():
            if not 0 <= ramp_id < num_ramps:
                raise ConfigError(f"thresholds names unknown ramp {ramp_id} (model has {num_ramps} candidate ramps)")
            if not math.isfinite(threshold) or not 0.0 <= threshold <= NEVER_EXIT:
                raise ConfigError(f"thresholds[{ramp_id}] = {threshold!r} is not a number in [0, 1]")

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": self.schema_version,
                "model": self.model,
                "version": self.version,
                "ramps": [{"id": r, "threshold": self.thresholds[r]} for r in self.active_ramps],
                "writer": self.writer,
                "written_at": self.written_at,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ExitConfig:
        """Parse without validating against a model (see ``validate``); raises ``ConfigError`` when malformed.

        Types are checked, not coerced: a version written as ``"3"`` or ``3.7``, a ramp id ``true`` or a threshold
        ``"0.9"`` is a writer's bug, and accepting it would publish something other than what was meant.
        """
        try:
            data: Any = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested documents
            raise ConfigError(f"exit configuration is not JSON: {exc!r}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"exit configuration must be a JSON object, got {type(data).__name__}")
        ramps = _field(data, "ramps", list)
        thresholds: dict[int, float] = {}
        for entry in ramps:
            if not isinstance(entry, dict):
                raise ConfigError(f"each of ramps must be an object with id and threshold, got {entry!r}")
            ramp_id = _field(entry, "id", int)
            if ramp_id in thresholds:
                raise ConfigError(f"ramp {ramp_id} is listed twice")
            thresholds[ramp_id] = float(_field(entry, "threshold", float))
        return cls(
            model=_field(data, "model", str),
            version=_field(data, "version", int),
            thresholds=thresholds,
            writer=_field(data, "writer", str, default=""),
            written_at=float(_field(data, "written_at", float, default=0.0)),
            schema_version=_field(data, "schema_version", int),
        )


_JSON_TYPES: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), list: (list,)}


def _field(document: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``document[name]`` if it has JSON type ``kind`` (bools are not numbers); ``default`` when absent and given."""
    if name not in document:
        if default is None:
            raise ConfigError(f"malformed exit configuration: {name!r} is missing")
        return default
    value = document[name]
    if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[kind]):
        raise ConfigError(f"malformed exit configuration: {name!r} must be {kind.__name__}, got {value!r}")
    return value
