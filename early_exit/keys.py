"""Redis key layout, in one place, so the backend and the controller can never disagree on names.

Keys are only ever built from a model name, never parsed back into one: model names (and prefixes) may contain
``:``, so whoever needs the model of a key keeps the mapping it built (the controller maps each feedback stream it
reads to its model).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "apparate"


@dataclass(frozen=True)
class RedisKeys:
    """Keys used for one served model.

    Args:
        model: Triton model name.
        prefix: namespace shared by every model of one deployment.
    """

    model: str
    prefix: str = DEFAULT_PREFIX

    @property
    def feedback(self) -> str:
        """Stream of per-batch feedback records (``XADD``, trimmed to an approximate length)."""
        return f"{self.prefix}:{self.model}:feedback"

    @property
    def config(self) -> str:
        """Current exit configuration (JSON string)."""
        return f"{self.prefix}:{self.model}:config"

    @property
    def notify(self) -> str:
        """Pub/sub channel announcing a new configuration version."""
        return f"{self.prefix}:{self.model}:config:notify"

    @property
    def manifest(self) -> str:
        """Manifest registered by the backend, so the controller needs nothing but Redis."""
        return f"{self.prefix}:{self.model}:manifest"

    @property
    def e3_plan(self) -> str:
        """The E3 plan in force (JSON, ``early_exit.e3_plan``) of an E3 router: registered by the router as prepared
        unless one is stored, re-sized by the controller; every replica's router reloads its block models to match."""
        return f"{self.prefix}:{self.model}:e3_plan"

    @property
    def status(self) -> str:
        """The active controller's status document for this model (JSON: holder, configuration version, window size,
        samples per replica, time written), rewritten about once a second while a controller is active."""
        return f"{self.prefix}:{self.model}:status"

    @staticmethod
    def models(prefix: str = DEFAULT_PREFIX) -> str:
        """Set of model names that registered a manifest."""
        return f"{prefix}:models"

    @staticmethod
    def controller_lease(prefix: str = DEFAULT_PREFIX) -> str:
        """Lease naming the one active controller of a deployment (holder name, with a time to live); its fencing
        epoch counter is this key with ``:epoch`` appended (``controller.lease``). Neither ends like a model's keys."""
        return f"{prefix}:controller:lease"
