"""One block group of an E3 plan run in-process: its blocks fused into one graph, then its exit's verdict.

The E3 router runs the first group itself (every request needs it, so a call to another model would only add a hop),
and each block model (``triton_backend.e3_block``) runs one later group; both run it through this class, so what a
group computes and returns does not depend on where it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from early_exit.runtime import EarlyExitModel


class BlockGroupRunner:
    """Args:
    directory: the source entry's version folder (manifest, blocks, ramps).
    device: where the blocks and the ramp run.
    first_block, last_block: the group's blocks.
    ramp: the ramp at its end, or ``None`` for the group that ends at the final layer.

    Raises:
        EarlyExitError: when the artifacts cannot be loaded.
        IndexError: when the group names blocks or a ramp the model does not have.
    """

    def __init__(self, directory: Path, device: torch.device, first_block: int, last_block: int,
                 ramp: int | None) -> None:
        self.model = EarlyExitModel(directory, device, range(first_block, last_block + 1),
                                    () if ramp is None else (ramp,))
        self.segment = self.model.segment(first_block, last_block, ramp)
        side = self.model.manifest.ramps[ramp].arch.get("inputs", ()) if ramp is not None else ()
        #: values it consumes: the blocks' inputs, then the ramp's side inputs (e.g. an attention mask)
        self.inputs: tuple[str, ...] = tuple(dict.fromkeys([*self.segment.inputs, *side]))
        #: values it passes on to the next group (the final layer passes nothing on)
        self.carried: tuple[str, ...] = self.segment.outputs if ramp is not None else ()

    def run(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The group on a batch: its carried values by name, and ``PROBS`` ``[n, classes]``, ``CONFIDENCE``
        ``[n, 1]`` (float32) and ``LABEL`` ``[n, 1]`` (int64), the exit's verdict on every sample."""
        device = self.model.device
        tensors = {name: torch.from_numpy(np.ascontiguousarray(values[name])).to(device) for name in self.inputs}
        with torch.inference_mode():
            outputs = self.segment.run(*(tensors[name] for name in self.segment.inputs))
            tensors.update(zip(self.segment.outputs, outputs))
            if self.segment.ramp is None:
                verdict = self.model.verdict(self.model.manifest.final_exit, outputs[0])
            else:
                verdict = self.model.ramp_verdict(self.segment.ramp, tensors, outputs[0])
            result = {name: tensors[name].cpu().numpy() for name in self.carried}
            result["PROBS"] = verdict.probs.cpu().numpy()
        result["CONFIDENCE"] = verdict.confidence[:, None].astype(np.float32)
        result["LABEL"] = verdict.prediction[:, None].astype(np.int64)
        return result
