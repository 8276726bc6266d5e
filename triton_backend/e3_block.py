"""Request path of an E3 block model (backend ``apparate_e3_block``): batch in → fused blocks → exit verdict → out.

One later block group of an E3 plan (``early_exit.e3_plan``; the router runs the first itself): the blocks between two
exits, fused into one graph, then the ramp at its end (or the original model's final layer). It is a plain non-decoupled
model with dynamic batching, one response per request, so Triton's batcher merges the survivors that the router forwards
from many upstream batches into full batches, and Triton's instance groups replicate it. It keeps no state between
requests; the router decides who exits.

Parameters (``config.pbtxt``): ``source`` (the Apparate entry in the same repository whose version folder holds the
artifacts), ``source_version`` (default ``1``), ``first_block``, ``last_block``, ``ramp`` (a ramp id, or empty for
the final layer), ``threads`` (torch threads of this instance on a CPU; 0 keeps torch's default).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from early_exit.e3_plan import VERDICT_OUTPUTS, tensor_name
from early_exit.errors import EarlyExitError
from triton_backend.block_group import BlockGroupRunner
from triton_backend.stub import configure_logging, model_device, model_parameters, share_cores

LOGGER = logging.getLogger("triton_backend.e3_block")


class TritonPythonModel:
    """Triton entry points for one instance of a block model."""

    def initialize(self, args: dict[str, str]) -> None:
        configure_logging(LOGGER)
        parameters = model_parameters(json.loads(args["model_config"]))
        self.name = args["model_name"]
        try:
            source = parameters["source"]
            first, last = int(parameters["first_block"]), int(parameters["last_block"])
            ramp = int(parameters["ramp"]) if parameters.get("ramp", "") != "" else None
        except (KeyError, ValueError) as exc:
            raise pb_utils.TritonModelException(f"{self.name}: bad or missing parameter: {exc!r}") from exc
        share_cores(parameters)
        directory = Path(args["model_repository"]).parent / source / parameters.get("source_version", "1")
        try:
            self.group = BlockGroupRunner(directory, model_device(args), first, last, ramp)
        except (EarlyExitError, IndexError) as exc:
            raise pb_utils.TritonModelException(f"{self.name}: cannot load blocks {first}-{last} of {directory}: "
                                                f"{exc}") from exc
        LOGGER.info("%s: blocks %d-%d of %s, exit %s, on %s", self.name, first, last, source,
                    "final" if ramp is None else f"ramp {ramp}", self.group.model.device)

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            arrays = {name: [pb_utils.get_input_tensor_by_name(request, tensor_name(name)).as_numpy()
                             for request in requests] for name in self.group.inputs}
            sizes = [array.shape[0] for array in arrays[self.group.inputs[0]]]
            outputs = self.group.run({name: np.concatenate(parts) for name, parts in arrays.items()})
        except Exception as exc:  # every request gets an answer; the router turns it into its client's error
            LOGGER.exception("%s: batch of %d failed", self.name, len(requests))
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {exc}")) for _ in requests]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        names = [tensor_name(name) for name in self.group.carried] + list(VERDICT_OUTPUTS)
        arrays = [outputs[name] for name in (*self.group.carried, *VERDICT_OUTPUTS)]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array[lo:hi])
                                                           for name, array in zip(names, arrays)])
                for lo, hi in zip(bounds[:-1], bounds[1:])]
