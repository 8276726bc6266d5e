"""``make bench-llm``: a causal LM with per-token exits against its vanilla twin, both served by one tritonserver.

Concurrent gRPC streams (``--streams``, each sending its next prompt when the last one finished: a closed loop)
replay the same chat prompts (SST-2 dev sentences, asking in turn to continue or to summarise the review) to the
early-exit entry and to ``<name>_vanilla``, in alternating segments so that both see the same machine state; each
segment is one pass over the prompts. Per request the client records when it sent it and when each token arrived.

Reported per system (as vLLM's benchmarks define them): **time per output token** (TPOT: from the first token to the
last, divided by the tokens after the first; median and p99 over requests), **inter-token latency** (every gap
between consecutive tokens; median and p99), **time to first token** (TTFT), **tokens/s** over the segments' wall
time, the share of tokens that exited, **token agreement** (the server's deep-pass verdicts: streamed tokens equal to
the original model's token after the same prefix, from ``apparate_llm_exit_verdicts_total``) and **whole-sequence
exact match** with the vanilla entry's output for the same prompt. Savings are ratios against vanilla in the same run.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from early_exit.model_config import vanilla_twin
from model_zoo.datasets import DEFAULT_SST2_DIR
from triton_backend.llm_setup import load_llm, parameter_item
from workload.llm_exit_study import prompts as review_prompts
from workload.metrics import metric
from workload.stack import running_stack

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Generation:
    """One request: its prompt index, when it was sent, each token's arrival (``time.perf_counter``), ids, exits."""

    prompt: int
    sent: float
    arrivals: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft_ms(self) -> float:
        return 1000 * (self.arrivals[0] - self.sent)

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first; ``None`` for a single token."""
        if len(self.arrivals) < 2:
            return None
        return 1000 * (self.arrivals[-1] - self.arrivals[0]) / (len(self.arrivals) - 1)

    @property
    def gaps_ms(self) -> list[float]:
        return [1000 * (b - a) for a, b in zip(self.arrivals, self.arrivals[1:])]


def _inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode()],
                                          dtype=object))
    return [text, stream, sampling]


def _stream_worker(url: str, model: str, prompts: list[str], work: queue.Queue, max_tokens: int,
                   out: list[Generation], timeout_s: float) -> None:
    """One gRPC stream: takes prompt indices from ``work`` until it is empty, one request at a time."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()

    def callback(result, error) -> None:
        responses.put((time.perf_counter(), result, error))

    client.start_stream(callback=callback)
    try:
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                return
            generation = Generation(index, time.perf_counter())
            client.async_stream_infer(model, _inputs(prompts[index], max_tokens), request_id=str(index),
                                      enable_empty_final_response=True)
            while True:
                try:
                    arrived, result, error = responses.get(timeout=timeout_s)
                except queue.Empty:
                    generation.error = f"no response within {timeout_s:.0f} s"
                    break
                if error is not None:
                    generation.error = str(error)
                    break
                ids = result.as_numpy("TOKEN_IDS")
                if ids is not None and len(ids):
                    generation.arrivals += [arrived] * len(ids)
                    generation.ids += [int(i) for i in ids]
                    generation.exits += [int(e) for e in result.as_numpy("EXIT")]
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
            out.append(generation)
    finally:
        client.stop_stream()
        client.close()


def run_segment(url: str, model: str, prompts: list[str], streams: int, max_tokens: int,
                timeout_s: float = 120.0) -> tuple[list[Generation], float]:
    """Every prompt once through ``streams`` concurrent streams; the generations and the wall time."""
    work: queue.Queue = queue.Queue()
    for index in range(len(prompts)):
        work.put(index)
    out: list[Generation] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=_stream_worker, args=(url, model, prompts, work, max_tokens, out, timeout_s))
               for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out, time.perf_counter() - started


def _verdicts(metrics_url: str, model: str) -> tuple[float, float]:
    return (metric(metrics_url, "apparate_llm_exit_verdicts_total", model=model, verdict="agree"),
            metric(metrics_url, "apparate_llm_exit_verdicts_total", model=model, verdict="disagree"))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Summary:
    tpot: tuple[float, float]
    itl: tuple[float, float]
    ttft: tuple[float, float]
    tokens_per_s: float
    tokens: int
    exited: float
    errors: int

    @classmethod
    def of(cls, generations: list[Generation], wall_s: float, num_layers: int) -> Summary:
        good = [g for g in generations if g.error is None and g.arrivals]
        tpot = [t for g in good if (t := g.tpot_ms) is not None]
        gaps = [gap for g in good for gap in g.gaps_ms]
        ttft = [g.ttft_ms for g in good]
        tokens = sum(len(g.ids) for g in good)
        exited = sum(e < num_layers for g in good for e in g.exits)
        return cls((_percentile(tpot, 50), _percentile(tpot, 99)), (_percentile(gaps, 50), _percentile(gaps, 99)),
                   (_percentile(ttft, 50), _percentile(ttft, 99)), tokens / wall_s, tokens,
                   exited / max(tokens, 1), len(generations) - len(good))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.llm_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="early-exit entry; <model>_vanilla is its twin")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_SST2_DIR, help="folder with SST-2 dev.tsv")
    parser.add_argument("--prompts", type=int, default=32, help="SST-2 dev sentences to prompt with (the first N)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--streams", type=int, default=4, help="concurrent gRPC streams")
    parser.add_argument("--rounds", type=int, default=3, help="segments per system, alternating")
    parser.add_argument("--controller", action="store_true",
                        help="run the controller too (thresholds follow the token-agreement budget)")
    parser.add_argument("--param", action="append", default=[], type=parameter_item, metavar="KEY=VALUE",
                        help="override a parameter of the early-exit entry for this run (e.g. partial_exits=true)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here too")
    args = parser.parse_args(argv)
    overrides = dict(args.param)

    texts = review_prompts(args.prompts, args.data_dir)
    vanilla = vanilla_twin(args.model)
    systems = (vanilla, args.model)
    runs: dict[str, list[tuple[list[Generation], float]]] = {s: [] for s in systems}
    with running_stack(args.repository, models=list(systems), with_controller=args.controller) as stack:
        if overrides:
            stack.reload(args.model, overrides)
        config = grpcclient.InferenceServerClient(stack.grpc_url).get_model_config(args.model, as_json=True)["config"]
        model, tokenizer = load_llm(config["parameters"]["model"]["string_value"], args.repository / args.model / "1")
        num_layers = model.config.num_layers
        del model
        prompts = [tokenizer.chat(text) for text in texts]
        for name in systems:  # warm-up: first passes allocate and load lazily
            run_segment(stack.grpc_url, name, prompts[: args.streams], args.streams, 4)
        before = _verdicts(stack.metrics_url, args.model)
        for round_index in range(args.rounds):
            order = systems if round_index % 2 == 0 else systems[::-1]
            for name in order:
                runs[name].append(run_segment(stack.grpc_url, name, prompts, args.streams, args.max_tokens))
                print(f"round {round_index + 1}/{args.rounds} {name}: {runs[name][-1][1]:.1f} s", file=sys.stderr,
                      flush=True)
        after = _verdicts(stack.metrics_url, args.model)
    agreed, disagreed = after[0] - before[0], after[1] - before[1]
    report = _report(args, runs, systems, num_layers, agreed, disagreed)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


def _report(args: argparse.Namespace, runs: dict[str, list[tuple[list[Generation], float]]],
            systems: tuple[str, str], num_layers: int, agreed: float, disagreed: float) -> str:
    vanilla, early = systems
    summaries = {name: Summary.of([g for gens, _ in runs[name] for g in gens], sum(w for _, w in runs[name]),
                                  num_layers) for name in systems}
    per_round = {name: [statistics.median([t for g in gens if (t := g.tpot_ms) is not None]) for gens, _ in runs[name]]
                 for name in systems}
    savings = [1 - e / v for v, e in zip(per_round[vanilla], per_round[early])]
    reference = {g.prompt: g.ids for gens, _ in runs[vanilla] for g in gens if g.error is None}
    early_runs = [g for gens, _ in runs[early] for g in gens if g.error is None]
    exact = sum(g.ids == reference.get(g.prompt) for g in early_runs)
    tokens = summaries[early].tokens
    lines = [f"# {early}: per-token exits vs {vanilla} on one tritonserver", "",
             f"- command: `python -m workload.llm_bench --model {early} --prompts {args.prompts} --max-tokens "
             f"{args.max_tokens} --streams {args.streams} --rounds {args.rounds}"
             + (" --controller" if args.controller else "") + "".join(f" --param {key}={value}" for key, value in args.param) + "`",
             f"- {args.prompts} chat prompts (SST-2 dev sentences, continue / summarise in turn), greedy, up to "
             f"{args.max_tokens} new tokens; {args.streams} concurrent gRPC streams (closed loop); {args.rounds} "
             "segments per system, alternating; thresholds "
             + ("tuned live by the controller" if args.controller else "as the entry was prepared (no controller)"),
             "", "| system | TPOT median ms | TPOT p99 ms | ITL median ms | ITL p99 ms | TTFT median ms | TTFT p99 ms "
             "| tokens/s | exited | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in systems:
        s = summaries[name]
        lines.append(f"| {name} | {s.tpot[0]:.1f} | {s.tpot[1]:.1f} | {s.itl[0]:.1f} | {s.itl[1]:.1f} | "
                     f"{s.ttft[0]:.1f} | {s.ttft[1]:.1f} | {s.tokens_per_s:.1f} | {s.exited:.1%} | {s.errors} |")
    v, e = summaries[vanilla], summaries[early]
    checked = agreed + disagreed
    lines += ["", f"- median time per output token: **{1 - e.tpot[0] / v.tpot[0]:+.1%}** vs vanilla (per segment: "
              + ", ".join(f"{x:+.1%}" for x in savings) + f"); p99 {e.tpot[1] / v.tpot[1] - 1:+.1%}; tokens/s "
              f"{e.tokens_per_s / v.tokens_per_s - 1:+.1%}; TTFT median {e.ttft[0] / v.ttft[0] - 1:+.1%}",
              f"- token agreement with the original model: **{1 - disagreed / max(tokens, 1):.2%}** of {tokens} "
              f"streamed tokens ({int(checked)} exited tokens checked by the deep pass, {int(disagreed)} disagreed)",
              f"- whole sequences equal to the vanilla entry's: {exact} of {len(early_runs)} (one disagreeing exit "
              "changes the rest of its sequence)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
