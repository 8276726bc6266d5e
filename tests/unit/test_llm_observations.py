"""Label-free feedback of early-exit decoding (``Decoder(observe=...)``): every sampled token carries the confidence
and token of every active ramp (deeper ramps evaluated in the deferred pass) and the original model's token."""

from __future__ import annotations

import pytest
import torch

from early_exit.llm_decoding import Decoder, ExitPolicy
from model_zoo.llama import Llama, init_random, tiny_config

LAYERS = tiny_config().num_layers
ALWAYS = {1: 0.0, 2: 0.0}  # every eligible token exits at layer 1; the ramp at layer 2 is only observed


@pytest.fixture(scope="module")
def tiny() -> Llama:
    return init_random(Llama(tiny_config()), seed=0)


def _reference(model: Llama, sequence: list[int]) -> dict[int, tuple[int, float]]:
    """Token and top-1 minus top-2 probability of each layer's ramp (and the final layer) at the last position."""
    with torch.inference_mode():
        out = model(torch.tensor([sequence]), exit_layers=range(1, LAYERS + 1))
        result = {}
        for layer, hidden in out.hidden_states.items():
            top = torch.softmax(model.exit_logits(hidden[0, -1]).float(), dim=-1).topk(2)
            result[layer] = (int(top.indices[0]), float(top.values[0] - top.values[1]))
    return result


def test_stream_mode_observes_every_ramp_of_every_exited_token(tiny: Llama) -> None:
    prompt = [5, 17, 42, 3, 60]
    decoder = Decoder(tiny, ExitPolicy(ALWAYS, max_consecutive=3, version=7), observe=1.0)
    row = decoder.generate(prompt, 14)
    exited = [index for index, token in enumerate(row.streamed) if token.exit < LAYERS]
    assert exited and len(exited) < len(row.streamed)  # the cap forces some tokens to full depth
    assert len(row.observations) == len(exited) == row.stats.exited
    for index, observation in zip(exited, row.observations):
        assert observation.complete and observation.ramps == (1, 2) and observation.version == 7
        assert observation.exit == 1 and observation.prediction[1] == row.streamed[index].id
        reference = _reference(tiny, prompt + [t.id for t in row.streamed[:index]])
        for layer in (1, 2):
            assert observation.prediction[layer] == reference[layer][0]
            assert observation.confidence[layer] == pytest.approx(reference[layer][1], abs=1e-4)
        assert observation.final == reference[LAYERS][0]
    agree = sum(o.prediction[1] == o.final for o in row.observations)
    assert agree == row.stats.agreed


def test_tokens_not_exiting_are_observed_at_full_depth(tiny: Llama) -> None:
    decoder = Decoder(tiny, ExitPolicy({1: 0.999, 2: 0.999}), observe=1.0)  # nothing clears 0.999 on this model
    row = decoder.generate([1, 2, 3], 8)
    assert all(t.exit == LAYERS for t in row.streamed)
    assert len(row.observations) == len(row.streamed) - 1  # the prefill's token is not exit-eligible
    for token, observation in zip(row.streamed[1:], row.observations):
        assert observation.complete and observation.exit == LAYERS and observation.final == token.id


def test_faithful_mode_drops_observations_of_rolled_back_drafts(tiny: Llama) -> None:
    prompt = [9, 8, 7, 6]
    decoder = Decoder(tiny, ExitPolicy(ALWAYS, max_consecutive=3, faithful=True), observe=1.0)
    row = decoder.generate(prompt, 16)
    assert [t.id for t in row.streamed] == tiny.generate(torch.tensor([prompt]), 16)
    assert row.stats.disagreed > 0
    assert all(o.complete for o in row.observations)
    assert len(row.observations) == row.stats.agreed + row.stats.disagreed
    assert sum(o.prediction[1] != o.final for o in row.observations) == row.stats.disagreed


def test_sampling_and_batching(tiny: Llama) -> None:
    assert not Decoder(tiny, ExitPolicy(ALWAYS)).generate([1, 2, 3], 8).observations  # observe=0: none
    decoder = Decoder(tiny, ExitPolicy(ALWAYS), observe=0.5, seed=1)
    rows = [decoder.start([4 + i, 5, 6], 30) for i in range(3)]
    while not all(r.finished for r in rows):
        decoder.step_many(rows)
    for r in rows:
        decoder.settle(r)
    observed = sum(len(r.observations) for r in rows)
    exited = sum(r.stats.exited for r in rows)
    assert 0.25 * exited < observed < 0.75 * exited
    assert all(o.complete for r in rows for o in r.observations)
