"""Artifact manifest of a ramp-augmented model: the one owner of its JSON format.

A model-repository entry's version folder holds ``manifest.json`` plus the files it names. The backbone is cut at
every candidate cut point into blocks (``block_<i>.pt2``, ``torch.export`` programs with a dynamic batch dimension);
candidate ramp ``i`` reads the primary output of block ``i``. Because the model is cut at *every* candidate, any
subset of ramps can be switched on or off at run time without reloading the model. A vanilla entry is the same format
with one block and no ramps, so the baseline runs through exactly the same code path.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from early_exit.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """A model input: Triton name, numpy dtype name and per-sample shape (no batch dimension)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BlockSpec:
    """One backbone block.

    Args:
        file: exported program, relative to the manifest.
        inputs: names of the values it consumes (model inputs or earlier blocks' outputs).
        outputs: names of the values it produces; ``outputs[0]`` is the primary value carried to the next block
            (the feature a ramp at this cut point reads), the others are side values such as an attention mask.
        sha256: digest of ``file``, checked on load.
    """

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str


@dataclass(frozen=True)
class RampSpec:
    """A candidate ramp after block ``after_block``.

    Args:
        id: position in the manifest's ramp list; exit configurations name ramps by this id.
        after_block: index of the block whose primary output feeds the ramp.
        arch: architecture description understood by ``early_exit.ramps.build_ramp``.
        label: human-readable cut point (for example the graph node it follows).
    """

    id: int
    after_block: int
    arch: dict[str, Any]
    label: str = ""


@dataclass(frozen=True)
class Profile:
    """Measured latency (milliseconds) per block and per ramp at each profiled batch size, on ``device``."""

    device: str
    batch_sizes: tuple[int, ...]
    block_ms: tuple[tuple[float, ...], ...]
    ramp_ms: tuple[tuple[float, ...], ...]

    @functools.cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sizes = np.asarray(self.batch_sizes, dtype=float)
        return (sizes, np.asarray(self.block_ms, dtype=float).reshape(-1, len(sizes)),
                np.asarray(self.ramp_ms, dtype=float).reshape(-1, len(sizes)))

    def at(self, batch_size: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-block and per-ramp latency at ``batch_size``, linearly interpolated between profiled sizes (clamped
        to the profiled range), every row at once: the E3 planner asks for thousands of sizes."""
        sizes, blocks, ramps = self._tables
        size = min(max(float(batch_size), sizes[0]), sizes[-1])
        right = min(max(int(np.searchsorted(sizes, size)), 1), len(sizes) - 1)
        left = max(right - 1, 0)
        weight = (size - sizes[left]) / (sizes[right] - sizes[left]) if right > left else 0.0
        return (blocks[:, left] * (1.0 - weight) + blocks[:, right] * weight,
                ramps[:, left] * (1.0 - weight) + ramps[:, right] * weight)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to load and reason about one ramp-augmented model.

    ``exits_fixed`` marks a deployment whose active ramps cannot change without redeploying it (E3 mode: every
    block model ends at an exit), so a controller tunes its thresholds but never moves, adds or drops ramps.
    """

    name: str
    classes: int
    inputs: tuple[TensorSpec, ...]
    blocks: tuple[BlockSpec, ...]
    ramps: tuple[RampSpec, ...]
    ramp_weights: str | None
    ramp_weights_sha256: str | None
    initial_thresholds: dict[int, float] = field(default_factory=dict)
    profile: Profile | None = None
    exits_fixed: bool = False
    schema_version: int = SCHEMA_VERSION

    @property
    def final_exit(self) -> int:
        """Exit index reported for samples answered by the original model's last layer."""
        return len(self.ramps)

    def segment_values(self, start: int, end: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What blocks ``start..end`` (inclusive) consume from outside, and what they produce that is needed
        afterwards: their last block's primary output first (what a ramp there reads, or the logits), then the side
        values later blocks consume."""
        inside = self.blocks[start : end + 1]
        produced = [name for spec in inside for name in spec.outputs]
        later = {name for spec in self.blocks[end + 1 :] for name in spec.inputs}
        primary = self.blocks[end].outputs[0]
        outputs = (primary, *(name for name in produced if name in later and name != primary))
        made = set(produced)
        inputs = tuple(dict.fromkeys(name for spec in inside for name in spec.inputs if name not in made))
        return inputs, outputs

    def to_json(self) -> str:
        data = asdict(self)
        data["initial_thresholds"] = {str(k): v for k, v in self.initial_thresholds.items()}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate; raises ``ArtifactError`` naming the offending field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ArtifactError("manifest must be a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"manifest schema_version {data.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
            )
        try:
            profile = data.get("profile")
            manifest = cls(
                name=str(data["name"]),
                classes=int(data["classes"]),
                inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
                blocks=tuple(
                    BlockSpec(b["file"], tuple(b["inputs"]), tuple(b["outputs"]), b["sha256"]) for b in data["blocks"]
                ),
                ramps=tuple(
                    RampSpec(int(r["id"]), int(r["after_block"]), dict(r["arch"]), r.get("label", ""))
                    for r in data["ramps"]
                ),
                ramp_weights=data.get("ramp_weights"),
                ramp_weights_sha256=data.get("ramp_weights_sha256"),
                initial_thresholds={int(k): float(v) for k, v in data.get("initial_thresholds", {}).items()},
                profile=None
                if profile is None
                else Profile(
                    profile["device"],
                    tuple(profile["batch_sizes"]),
                    tuple(tuple(row) for row in profile["block_ms"]),
                    tuple(tuple(row) for row in profile["ramp_ms"]),
                ),
                exits_fixed=bool(data.get("exits_fixed", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest field missing or malformed: {exc!r}") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Cross-field checks: block chaining, ramp ids and positions, profile shape."""
        self._validate_blocks()
        self._validate_ramps()

    def _validate_blocks(self) -> None:
        if not self.blocks:
            raise ArtifactError("manifest.blocks is empty")
        known = {spec.name for spec in self.inputs}
        for index, block in enumerate(self.blocks):
            missing = [name for name in block.inputs if name not in known]
            if missing:
                raise ArtifactError(f"manifest.blocks[{index}] consumes unknown values {missing}")
            known.update(block.outputs)

    def _validate_ramps(self) -> None:
        model_inputs = {spec.name for spec in self.inputs}
        for index, ramp in enumerate(self.ramps):
            unknown = [name for name in ramp.arch.get("inputs", []) if name not in model_inputs]
            if unknown:
                raise ArtifactError(f"manifest.ramps[{index}].arch.inputs names unknown model inputs {unknown}")
            if ramp.id != index:
                raise ArtifactError(f"manifest.ramps[{index}].id is {ramp.id}; ramp ids must equal their position")
            if not 0 <= ramp.after_block < len(self.blocks) - 1:
                raise ArtifactError(f"manifest.ramps[{index}].after_block {ramp.after_block} is out of range")
        if self.ramps and not self.ramp_weights:
            raise ArtifactError("manifest has ramps but no ramp_weights file")
        if self.profile is not None:
            if len(self.profile.block_ms) != len(self.blocks) or len(self.profile.ramp_ms) != len(self.ramps):
                raise ArtifactError("manifest.profile does not have one row per block and per ramp")
        for ramp_id in self.initial_thresholds:
            if not 0 <= ramp_id < len(self.ramps):
                raise ArtifactError(f"manifest.initial_thresholds names unknown ramp {ramp_id}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(directory: Path) -> Manifest:
    """Read ``manifest.json`` from a version folder and check every artifact's digest."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_FILE} in {directory}")
    manifest = Manifest.from_json(path.read_text(encoding="utf-8"))
    files = [(b.file, b.sha256) for b in manifest.blocks]
    if manifest.ramp_weights:
        files.append((manifest.ramp_weights, manifest.ramp_weights_sha256 or ""))
    for name, expected in files:
        artifact = Path(directory) / name
        if not artifact.is_file():
            raise ArtifactError(f"artifact {artifact} named by the manifest is missing")
        actual = sha256_of(artifact)
        if actual != expected:
            raise ArtifactError(f"artifact {artifact} is corrupt or mismatched: sha256 {actual} != manifest {expected}")
    return manifest
