"""``python -m controller.prepare.llm``: ramps for a causal LM, chosen from the model's own continuations of
unlabeled prompts, and its ``apparate_llm`` entry with the ``_vanilla`` twin.

What a classifier's ``prepare`` does with trained ramps, this does with the model's own final norm and LM head:

1. **Continuations.** The vanilla model greedily continues each prompt (rows decoded together), so everything below
   describes what the served model will say, not what the prompts say. No labels are used.
2. **Ramp vocabulary.** The ramps score only the ``--vocabulary`` tokens the model produced most often
   (``early_exit.llm_decoding.RampHead``): a full LM head costs several decoder layers of a small model (SmolLM2-135M:
   about eight), paid by every exit-eligible token whether it exits or not.
3. **Costs.** Per-token cost of a decoder layer, the LM head and a ramp, measured here; the entry carries them, so
   the controller's latency model needs no second measurement at load.
4. **Exits.** Each candidate layer's ramp is evaluated on the continuations (teacher forcing: the hidden states
   the decoder would see, since its KV caches are exact), and the classifiers' selection picks the layers and
   thresholds (``choose_initial_ramps``: candidates added one at a time, each step the one whose set with jointly
   tuned thresholds saves the most mean time per token, while the ramps' overhead stays within budget and that saving
   grows, agreement held to the budget by the controller's guard). Only chosen layers enter the entry: every ramp is
   paid by every eligible token, and the controller tunes the thresholds of an LLM entry's layers but never changes
   the set.

The summary says, per layer, how often its ramp agrees with the original model, what share of tokens it could
answer alone within the budget (the ceiling of that depth) and what the chosen thresholds exit there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from controller.guard import AccuracyGuard
from controller.latency import LatencyModel
from controller.prepare.bootstrap import read_texts
from controller.prepare.pipeline import PrepareSettings, answerable_share, choose_initial_ramps
from controller.tuner import evaluate
from early_exit.exit_rule import first_exit
from early_exit.llm_decoding import Decoder, RampHead
from model_zoo.llama import Llama
from triton_backend.llm_setup import (
    CharTokenizer,
    HFTokenizer,
    LLMSettings,
    TokenCosts,
    llm_manifest,
    load_llm,
    measure_costs,
    parameter_item,
    write_entries,
)

LOGGER = logging.getLogger("controller.prepare.llm")
VOCABULARY_FILE = "ramp_vocabulary.npy"


@dataclass(frozen=True)
class Continuation:
    """A prompt's token ids and the vanilla model's greedy continuation of it."""

    prompt: list[int]
    tokens: list[int]


@dataclass(frozen=True)
class LayerReport:
    layer: int
    agreement: float  # the ramp's token equals the original model's, all tokens
    answerable: float  # largest share it could answer alone within the budget
    threshold: float | None  # None: not chosen
    exits: float  # share of tokens the chosen thresholds exit here


@torch.inference_mode()
def continuations(model: Llama, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
                  rows: int = 16) -> list[Continuation]:
    """Greedy continuations by the vanilla model, ``rows`` prompts decoded together."""
    decoder = Decoder(model)
    out: list[Continuation] = []
    with tqdm(total=len(prompts), desc="continue prompts", unit="prompt") as progress:
        for start in range(0, len(prompts), rows):
            group = [decoder.start(p, max_new_tokens, eos_token_id) for p in prompts[start:start + rows]]
            while not all(row.finished for row in group):
                decoder.step_many([row for row in group if not row.finished])
            out += [Continuation(row.prompt, [t.id for t in row.streamed]) for row in group]
            progress.update(len(group))
    return out


def ramp_vocabulary(sequences: list[Continuation], size: int) -> np.ndarray:
    """The ``size`` tokens the model produced most often (ties by token id), most frequent first."""
    counts = Counter(t for s in sequences for t in s.tokens)
    ranked = sorted(counts, key=lambda token: (-counts[token], token))[:size]
    if len(ranked) < 2:
        raise ValueError(f"the continuations produced {len(ranked)} distinct token(s): too few for a ramp vocabulary")
    return np.asarray(ranked, dtype=np.int64)


@torch.inference_mode()
def ramp_observations(model: Llama, head: RampHead, sequences: list[Continuation], layers: list[int]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence and token of each layer's ramp ``[layers, tokens]`` on every continuation token, with the original
    model's token ``[tokens]``: one teacher-forced pass per sequence, whose hidden states equal the decoder's."""
    confidence, prediction, final = [], [], []
    for s in tqdm(sequences, desc="evaluate ramps", unit="sequence"):
        if not s.tokens:
            continue
        out = model(torch.tensor([s.prompt + s.tokens[:-1]]), exit_layers=layers)
        n = len(s.tokens)
        per_layer = [head(out.hidden_states[layer][0, -n:]) for layer in layers]
        prediction.append(np.stack([ids.cpu().numpy() for ids, _ in per_layer]))
        confidence.append(np.stack([c.cpu().numpy() for _, c in per_layer]))
        final.append(np.asarray(s.tokens))
    return (np.concatenate(confidence, axis=1).astype(np.float32), np.concatenate(prediction, axis=1),
            np.concatenate(final))


def choose_exits(confidence: np.ndarray, prediction: np.ndarray, final: np.ndarray, layers: list[int],
                 latency: LatencyModel, guard: AccuracyGuard, overhead_budget: float
                 ) -> tuple[dict[int, float], list[LayerReport]]:
    """The exit layers worth their ramps with their thresholds (decoder layer -> threshold), and per candidate layer
    what it does under them."""
    chosen = choose_initial_ramps(latency, confidence, prediction, final, guard, overhead_budget,
                                  [layer - 1 for layer in layers], objective="mean")
    exits = {ramp + 1: threshold for ramp, threshold in chosen.items()}
    rows = [layers.index(layer) for layer in sorted(exits)]
    first = first_exit(confidence[rows], np.asarray([exits[layer] for layer in sorted(exits)]))
    agrees = prediction == final[None, :]
    reports = []
    for i, layer in enumerate(layers):
        exited = float(np.mean(first == rows.index(i))) if i in rows else 0.0
        reports.append(LayerReport(layer, float(agrees[i].mean()),
                                   answerable_share(confidence[i], agrees[i], guard.floor), exits.get(layer), exited))
    return exits, reports


def _prompts(args: argparse.Namespace, tokenizer: CharTokenizer | HFTokenizer) -> list[list[int]]:
    texts = read_texts(args.data, args.text_column)[: args.limit]
    if not texts:
        raise SystemExit(f"--data {args.data}: no text")
    templates = args.template or ["{}"]
    texts = [templates[i % len(templates)].replace("{}", text) for i, text in enumerate(texts)]
    if args.chat:
        if not isinstance(tokenizer, HFTokenizer):
            raise SystemExit("--chat needs a model whose tokenizer has a chat template (a GGUF model)")
        texts = [tokenizer.chat(text) for text in texts]
    return [tokenizer.encode(text) for text in texts]


def _print_summary(reports: list[LayerReport], costs: TokenCosts, vocabulary: int, coverage: float,
                   modelled: float, agreement: float, tokens: int) -> None:
    print(f"\nper token: decoder layer {costs.layer_ms:.3f} ms, LM head {costs.head_ms:.3f} ms, ramp over "
          f"{vocabulary} tokens {costs.ramp_ms:.3f} ms (covers {coverage:.1%} of the {tokens} continuation tokens)")
    print(f"{'layer':>5} {'agreement':>9} {'alone':>6} {'threshold':>10} {'exits':>6}")
    for r in reports:
        shown = "-" if r.threshold is None else f"{r.threshold:.6f}"
        print(f"{r.layer:>5} {r.agreement:>9.1%} {r.answerable:>6.1%} {shown:>10} {r.exits:>6.1%}")
    if not any(r.threshold is not None for r in reports):
        print("no layer's ramp pays for itself within the budget: the entry serves the original model")
    print(f"chosen exits on these tokens: agreement {agreement:.2%} with the original model, modelled saving "
          f"{modelled:.1%} of vanilla's time per token")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m controller.prepare.llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repository", type=Path)
    parser.add_argument("name", help="Triton model name; <name>_vanilla is written too")
    parser.add_argument("--model", required=True,
                        help="tiny:<seed>, smollm2, a llama GGUF file or a Hugging Face LlamaForCausalLM folder")
    parser.add_argument("--layers", required=True,
                        help="candidate exit layers, comma-separated (1 .. layers - 1), e.g. 20,24,28")
    parser.add_argument("--data", type=Path, required=True,
                        help="unlabeled prompts: .txt (one per line), .csv/.tsv/.jsonl (see --text-column)")
    parser.add_argument("--text-column", default=None, help="CSV/TSV column or JSONL key holding the text")
    parser.add_argument("--limit", type=int, default=256, help="prompts used (the first N)")
    parser.add_argument("--template", action="append", default=None, metavar="TEXT",
                        help="wrap each prompt: '{}' stands for it (repeatable: used in turn)")
    parser.add_argument("--chat", action="store_true",
                        help="send prompts in the model's chat template, as clients of an instruct model do")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per prompt (fewer at EOS)")
    parser.add_argument("--vocabulary", type=int, default=1024,
                        help="tokens the ramps score (the most frequent in the continuations); 0: the full LM head")
    parser.add_argument("--accuracy-budget", type=float, default=AccuracyGuard.budget,
                        help="token agreement the thresholds may lose against the original model")
    parser.add_argument("--z", type=float, default=AccuracyGuard.z, help="the guard's lower-confidence-bound quantile")
    parser.add_argument("--overhead-budget", type=float, default=PrepareSettings.overhead_budget,
                        help="the chosen ramps may add at most this share to a token that exits nowhere")
    parser.add_argument("--param", action="append", default=[], type=parameter_item, metavar="KEY=VALUE",
                        help="another parameter of the entry (max_rows, mode, threads, ...)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads here (0: torch's default)")
    return parser


def _entry_parameters(parser: argparse.ArgumentParser, args: argparse.Namespace, source: str,
                      exits: dict[int, float], costs: TokenCosts) -> dict[str, str]:
    """The entry's parameters, refused here when the backend would refuse them."""
    parameters = {"model": source, "exits": ",".join(f"{layer}:{t:.7g}" for layer, t in sorted(exits.items())),
                  **costs.parameters(), **dict(args.param)}
    try:
        LLMSettings.from_parameters(parameters)
    except ValueError as exc:
        parser.error(str(exc))
    return parameters


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    source = args.model
    if Path(source).exists():  # the entry resolves relative paths against its version folder: store where it is
        source = str(Path(source).resolve())
    model, tokenizer = load_llm(source)
    try:
        layers = sorted({int(layer) for layer in args.layers.split(",") if layer.strip()})
    except ValueError:
        parser.error(f"--layers {args.layers!r}: give decoder layers as integers")
    if not layers or not all(1 <= layer < model.config.num_layers for layer in layers):
        parser.error(f"--layers must be in 1..{model.config.num_layers - 1}")

    sequences = continuations(model, _prompts(args, tokenizer), args.max_new_tokens, tokenizer.eos_token_id)
    try:
        vocabulary = ramp_vocabulary(sequences, args.vocabulary) if args.vocabulary else None
    except ValueError as exc:
        raise SystemExit(f"{exc}: give more or longer prompts, or --vocabulary 0 for the full LM head") from exc
    head = RampHead(model, None if vocabulary is None else torch.from_numpy(vocabulary))
    costs = measure_costs(model, head)
    confidence, prediction, final = ramp_observations(model, head, sequences, layers)
    manifest = llm_manifest(args.name, model.config.num_layers, model.config.vocab_size, {}, costs)
    latency = LatencyModel.from_manifest(manifest, 1)
    exits, reports = choose_exits(confidence, prediction, final, layers, latency,
                                  AccuracyGuard(args.accuracy_budget, args.z), args.overhead_budget)
    parameters = _entry_parameters(parser, args, source, exits, costs)

    version = args.repository / args.name / "1"
    version.mkdir(parents=True, exist_ok=True)
    if vocabulary is not None:
        np.save(version / VOCABULARY_FILE, vocabulary)
        parameters["ramp_vocabulary"] = VOCABULARY_FILE
    for entry in write_entries(args.repository, args.name, parameters):
        LOGGER.info("wrote %s", args.repository / entry)
    chosen = sorted(exits)
    rows = [layers.index(layer) for layer in chosen]
    result = evaluate(np.asarray([exits[layer] for layer in chosen]), confidence[rows],
                      prediction[rows] == final[None, :], latency.exit_latencies([layer - 1 for layer in chosen]))
    coverage = float(np.isin(final, vocabulary).mean()) if vocabulary is not None else 1.0
    _print_summary(reports, costs, head.size, coverage, result.saving_ms / latency.vanilla_ms, result.accuracy,
                   len(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
