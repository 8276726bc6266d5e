"""Block groups run in-process (the E3 router's first group, every block model's own): chained, they give the same
verdicts as the whole model, in the tensors and dtypes the router and Triton expect."""

from pathlib import Path

import numpy as np
import torch

from early_exit.runtime import EarlyExitModel
from tests.conftest import MODEL
from triton_backend.block_group import BlockGroupRunner


def test_groups_chained_at_a_ramp_give_the_whole_models_verdicts(repository: Path) -> None:
    directory = repository / MODEL / "1"
    whole = EarlyExitModel(directory)
    ramp = whole.manifest.ramps[len(whole.manifest.ramps) // 2]
    last_block = len(whole.manifest.blocks) - 1
    first = BlockGroupRunner(directory, torch.device("cpu"), 0, ramp.after_block, ramp.id)
    rest = BlockGroupRunner(directory, torch.device("cpu"), ramp.after_block + 1, last_block, None)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        at_ramp, final = whole.stages({"IMAGE": torch.from_numpy(images)}, [ramp.id])

    head = first.run({"IMAGE": images})
    tail = rest.run({name: head[name] for name in rest.inputs})

    assert first.inputs == ("IMAGE",) and set(rest.inputs) <= set(first.carried) and rest.carried == ()
    assert set(head) == {*first.carried, "PROBS", "CONFIDENCE", "LABEL"} and set(tail) == {"PROBS", "CONFIDENCE",
                                                                                          "LABEL"}
    for outputs, verdict in ((head, at_ramp), (tail, final)):
        np.testing.assert_allclose(outputs["PROBS"], verdict.probs.numpy(), rtol=0, atol=1e-6)
        assert outputs["CONFIDENCE"].shape == (6, 1) and outputs["CONFIDENCE"].dtype == np.float32
        assert outputs["LABEL"].dtype == np.int64 and np.array_equal(outputs["LABEL"][:, 0], verdict.prediction)
