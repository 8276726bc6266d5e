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
        """Parse without validating against a model (see ``validate``); raises ``ConfigError`` when malformed."""
        try:
            data: Any = json.loads(text)
            thresholds: dict[int, float] = {}
            for entry in data["ramps"]:
                ramp_id = int(entry["id"])
                if ramp_id in thresholds:
                    raise ConfigError(f"ramp {ramp_id} is listed twice")
                thresholds[ramp_id] = float(entry["threshold"])
            return cls(
                model=str(data["model"]),
                version=int(data["version"]),
                thresholds=thresholds,
                writer=str(data.get("writer", "")),
                written_at=float(data.get("written_at", 0.0)),
                schema_version=int(data["schema_version"]),
            )
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"malformed exit configuration: {exc!r}") from exc
