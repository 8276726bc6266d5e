"""Block groups run in-process (the E3 router's first group, every block model's own): chained, they give the same
verdicts as the whole model, in the tensors and dtypes the router and Triton expect; the router's workers merge the
batches waiting for them and answer each apart."""

import asyncio
import threading
from pathlib import Path

import numpy as np
import torch

from early_exit.runtime import EarlyExitModel
from tests.conftest import MODEL
from triton_backend.block_group import BlockGroupRunner, MergingWorkers


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


def test_batches_waiting_for_a_busy_worker_are_merged_into_one_call_and_answered_apart() -> None:
    calls: list[int] = []
    release = threading.Event()

    def run(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(values["x"]))
        release.wait(5)
        return {"twice": 2 * values["x"], "sum": values["x"].sum(axis=1, keepdims=True)}

    async def serve() -> list[dict[str, np.ndarray]]:
        workers = MergingWorkers(run, "x", replicas=1, max_batch=5)
        batches = [np.full((rows, 2), float(k)) for k, rows in enumerate((1, 2, 2, 3))]
        tasks = [asyncio.create_task(workers.run({"x": batch})) for batch in batches]
        await asyncio.sleep(0.05)  # the first batch holds the only worker; the others wait
        release.set()
        try:
            return await asyncio.gather(*tasks)
        finally:
            workers.close()

    answers = asyncio.run(serve())
    # the waiting batches of 2 and 2 rows merge (4 <= 5); the batch of 3 would exceed it and runs next
    assert calls == [1, 4, 3]
    for k, (rows, answer) in enumerate(zip((1, 2, 2, 3), answers)):
        assert np.array_equal(answer["twice"], np.full((rows, 2), 2.0 * k))
        assert np.array_equal(answer["sum"], np.full((rows, 1), 2.0 * k))


def test_a_failed_call_fails_every_batch_merged_into_it() -> None:
    def run(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("blocks failed")

    async def serve() -> list[object]:
        workers = MergingWorkers(run, "x", replicas=1, max_batch=8)
        tasks = [asyncio.create_task(workers.run({"x": np.zeros((1, 2))})) for _ in range(3)]
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            workers.close()

    outcomes = asyncio.run(serve())
    assert len(outcomes) == 3 and all(isinstance(o, RuntimeError) and "blocks failed" in str(o) for o in outcomes)
