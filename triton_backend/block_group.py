"""One block group of an E3 plan run in-process: its blocks fused into one graph, then its exit's verdict.

The E3 router runs the first group itself (every request needs it, so a call to another model would only add a hop),
in ``MergingWorkers``, and each block model (``triton_backend.e3_block``) runs one later group; both run it through
``BlockGroupRunner``, so what a group computes and returns does not depend on where it runs.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
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


class MergingWorkers:
    """Worker threads that run a block group on the batches waiting for it, merged: each worker that frees up takes
    every waiting batch (up to ``max_batch`` samples) as one call.

    The E3 router's ``execute`` returns at once, so Triton's batcher never sees the batches waiting for the router's
    first group: they wait here, and without merging they ran one by one at the size the router's batcher gave them,
    which under load stayed small while their number grew (measured on ResNet-56 without merging: E3 collapsed from
    221 req/s on, half its closed-loop capacity, at 0.44x the original model's goodput). Merging here does what
    Triton's batcher did when a block model ran the first group.

    Use from one event loop: ``run`` and the completion callbacks share ``waiting`` and ``running`` without locks.
    ``resize`` may come from another thread: it only swaps the pool and the number of concurrent calls.

    Args:
        run: the group on one batch (``BlockGroupRunner.run``); every output has the batch as its first dimension.
        rows_of: name of an input whose first dimension is the batch.
        replicas: calls at a time (worker threads).
        max_batch: most samples merged into one call (a single larger batch still runs alone).
    """

    def __init__(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], rows_of: str, replicas: int,
                 max_batch: int, name: str = "block-group") -> None:
        self._run = run
        self._rows_of = rows_of
        self._name = name
        self.max_batch = max_batch
        self.replicas = replicas
        self._pool = ThreadPoolExecutor(max_workers=replicas, thread_name_prefix=name)
        self.running = 0
        self.waiting: deque[tuple[dict[str, np.ndarray], asyncio.Future[dict[str, np.ndarray]]]] = deque()

    async def run(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The group's outputs for ``values``, computed alone or merged with other waiting batches."""
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self.waiting.append((values, future))
        self._dispatch()
        return await future

    def resize(self, replicas: int) -> None:
        """Run ``replicas`` calls at a time from now on. Workers of the old pool finish the calls they were given and
        exit once it is unreferenced; shutting it down here could refuse a call the event loop is handing it."""
        self._pool = ThreadPoolExecutor(max_workers=replicas, thread_name_prefix=self._name)
        self.replicas = replicas

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting and self.running < self.replicas:
            taken, rows = [], 0
            while self.waiting and (not taken or rows + len(self.waiting[0][0][self._rows_of]) <= self.max_batch):
                taken.append(self.waiting.popleft())
                rows += len(taken[-1][0][self._rows_of])
            names = taken[0][0].keys()
            merged = taken[0][0] if len(taken) == 1 else {
                name: np.concatenate([values[name] for values, _ in taken]) for name in names}
            self.running += 1
            call = loop.run_in_executor(self._pool, self._run, merged)
            call.add_done_callback(functools.partial(self._finished, taken))

    def _finished(self, taken: list[tuple[dict[str, np.ndarray], asyncio.Future[dict[str, np.ndarray]]]],
                  call: asyncio.Future[dict[str, np.ndarray]]) -> None:
        self.running -= 1
        error = call.exception()
        outputs = call.result() if error is None else {}
        bounds = np.cumsum([0, *(len(values[self._rows_of]) for values, _ in taken)])
        for (_, future), lo, hi in zip(taken, bounds[:-1], bounds[1:]):
            if future.done():  # its request's task was cancelled
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result({name: array[lo:hi] for name, array in outputs.items()})
        self._dispatch()
