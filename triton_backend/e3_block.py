"""Request path of an E3 block model (backend ``apparate_e3_block``): batch in → fused blocks → exit verdict → out.

One block group of an E3 plan (``early_exit.e3_plan``): the blocks between two exits, fused into one graph, then the
ramp at its end (or the original model's final layer). It is a plain non-decoupled model with dynamic batching, one
response per request, so Triton's batcher merges the survivors that the router forwards from many upstream batches
into full batches, and Triton's instance groups replicate it. It keeps no state between requests; the router decides
who exits.

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
import torch
import triton_python_backend_utils as pb_utils

from early_exit.e3_plan import tensor_name
from early_exit.errors import EarlyExitError
from early_exit.runtime import EarlyExitModel
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
            self.model = EarlyExitModel(directory, model_device(args), range(first, last + 1),
                                        () if ramp is None else (ramp,))
            self.segment = self.model.segment(first, last, ramp)
        except (EarlyExitError, IndexError) as exc:
            raise pb_utils.TritonModelException(f"{self.name}: cannot load blocks {first}-{last} of {directory}: "
                                                f"{exc}") from exc
        manifest = self.model.manifest
        side = manifest.ramps[ramp].arch.get("inputs", ()) if ramp is not None else ()
        self.inputs = tuple(dict.fromkeys([*self.segment.inputs, *side]))
        self.carried = self.segment.outputs if ramp is not None else ()  # the final layer passes nothing on
        LOGGER.info("%s: blocks %d-%d of %s, exit %s, on %s", self.name, first, last, source,
                    "final" if ramp is None else f"ramp {ramp}", self.model.device)

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            arrays = {name: [pb_utils.get_input_tensor_by_name(request, tensor_name(name)).as_numpy()
                             for request in requests] for name in self.inputs}
            sizes = [array.shape[0] for array in arrays[self.inputs[0]]]
            values = {name: torch.from_numpy(np.concatenate(parts)).to(self.model.device)
                      for name, parts in arrays.items()}
            with torch.inference_mode():
                outputs = self.segment.run(*(values[name] for name in self.segment.inputs))
                values.update(zip(self.segment.outputs, outputs))
                if self.segment.ramp is None:
                    verdict = self.model.verdict(self.model.manifest.final_exit, outputs[0])
                else:
                    verdict = self.model.ramp_verdict(self.segment.ramp, values, outputs[0])
                carried = {name: values[name].cpu().numpy() for name in self.carried}
                probs = verdict.probs.cpu().numpy()
        except Exception as exc:  # every request gets an answer; the router turns it into its client's error
            LOGGER.exception("%s: batch of %d failed", self.name, len(requests))
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {exc}")) for _ in requests]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        responses = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tensors = [pb_utils.Tensor(tensor_name(name), array[lo:hi]) for name, array in carried.items()]
            tensors += [
                pb_utils.Tensor("PROBS", probs[lo:hi]),
                pb_utils.Tensor("CONFIDENCE", verdict.confidence[lo:hi, None].astype(np.float32)),
                pb_utils.Tensor("LABEL", verdict.prediction[lo:hi, None].astype(np.int64)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
