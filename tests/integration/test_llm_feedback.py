"""The controller tunes an ``apparate_llm`` entry from its label-free feedback: the tiny random Llama served by a real
tritonserver with exits at layers 1 and 2 (threshold 0: every exit-eligible token exits at layer 1), feedback on
every eligible token, and ``python -m controller``. The controller discovers the entry by its manifest, reads its
records (per observed token: both ramps' confidence and token, the original model's token), finds the agreement far
below the 1 % budget and publishes thresholds the backend applies; afterwards at least 99 % of the streamed tokens
equal the original model's token."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Iterator

import pytest
import redis

from controller.config_store import read_config
from early_exit.exit_rule import NEVER_EXIT
from early_exit.keys import RedisKeys
from early_exit.manifest import Manifest
from triton_backend.llm_setup import write_entries
from workload.metrics import metric
from workload.stack import Stack, running_stack

pytestmark = pytest.mark.integration

MODEL = "tiny_llm_fb"
VANILLA = f"{MODEL}_vanilla"
LAYERS = 3
TOKENS = 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    repository = tmp_path_factory.mktemp("llm_feedback_repository")
    write_entries(repository, MODEL, {"model": "tiny:5", "threads": "1", "exits": "1:0.0,2:0.0",
                                      "max_consecutive_exits": "3", "config_poll_seconds": "0.2",
                                      "feedback_sample": "1.0", "feedback_tokens": "16"})
    controller_args = ["--model", MODEL, "--min-fresh", "64", "--window", "1000", "--adjust-every", "0"]
    with running_stack(repository, models=[MODEL, VANILLA], controller_args=controller_args,
                       log_dir=tmp_path_factory.mktemp("llm_feedback_logs")) as running:
        yield running


def _prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.!?ABCDEFGHIJ0123456789"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(4, 16))) for _ in range(count)]


def _generate(stack: Stack, model: str, prompt: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.ports.http}/v2/models/{model}/generate",
        json.dumps({"text_input": prompt, "stream": False, "exclude_input_in_output": True,
                    "parameters": {"max_tokens": TOKENS, "temperature": 0}}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_controller_tunes_the_llm_entry_from_its_feedback(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    keys = RedisKeys(MODEL)
    deadline = time.monotonic() + 30
    while (text := client.get(keys.manifest)) is None:  # registered with the first feedback record
        _generate(stack, MODEL, "hello")
        assert time.monotonic() < deadline, "the entry never registered its manifest"
    manifest = Manifest.from_json(text.decode())
    assert manifest.exits_fixed and len(manifest.ramps) == LAYERS - 1 and manifest.initial_thresholds == {0: 0.0,
                                                                                                        1: 0.0}
    deadline = time.monotonic() + 180
    config = None
    for prompt in _prompts(400, seed=1):  # traffic until the controller publishes a configuration
        _generate(stack, MODEL, prompt)
        config = read_config(client, keys)
        if config is not None and config.version >= 1:
            break
        assert time.monotonic() < deadline
    log = stack.process("controller").log.read_text()
    assert config is not None and config.version >= 1, f"no configuration published; controller log:\n{log[-3000:]}"
    assert f"controlling {MODEL}" in log
    deadline = time.monotonic() + 10
    while (status := json.loads(client.get(keys.status) or "{}")).get("window", 0) == 0:  # written once a second
        assert time.monotonic() < deadline, f"the controller's status never showed feedback: {status}"
        _generate(stack, MODEL, "hello")
        time.sleep(0.2)
    assert status["ramps"] == [0, 1] and sum(status["replicas"].values()) > 0
    assert set(config.thresholds) == {0, 1}
    assert any(t > 0.0 for t in config.thresholds.values())  # tightened: threshold 0 breached the budget
    deadline = time.monotonic() + 10
    while metric(stack.metrics_url, "apparate_config_version", model=MODEL) < config.version:
        assert time.monotonic() < deadline, "the backend never applied the controller's configuration"
        time.sleep(0.05)
    applied = int(metric(stack.metrics_url, "apparate_config_version", model=MODEL))
    # Judged on prompts the controller never saw, under the configuration in use.
    tokens = metric(stack.metrics_url, "apparate_llm_tokens_total", model=MODEL)
    disagreed = metric(stack.metrics_url, "apparate_llm_exit_verdicts_total", model=MODEL, verdict="disagree")
    equal = total = exited = 0
    for prompt in _prompts(30, seed=2):
        answer, original = _generate(stack, MODEL, prompt), _generate(stack, VANILLA, prompt)
        exited += sum(e < LAYERS for e in answer["EXIT"])
        # position by position until the first difference (after it, the stream continues another text)
        for mine, theirs in zip(answer["TOKEN_IDS"], original["TOKEN_IDS"]):
            if mine != theirs:
                break
            equal += 1
        total += len(answer["TOKEN_IDS"])
    streamed = metric(stack.metrics_url, "apparate_llm_tokens_total", model=MODEL) - tokens
    wrong = metric(stack.metrics_url, "apparate_llm_exit_verdicts_total", model=MODEL, verdict="disagree") - disagreed
    print(f"applied v{applied} {config.thresholds}: {exited} of {int(streamed)} tokens exited, {int(wrong)} "
          f"disagreed with the original model; {equal}/{total} equal to the vanilla twin up to the first difference")
    assert streamed == total == 30 * TOKENS
    assert wrong <= 0.01 * streamed
    # The controller may publish again while the held-out prompts run: judge "nothing exits" only when the
    # configuration applied before them was still in use after them.
    in_use = read_config(client, keys)
    unchanged = in_use is not None and in_use.version == applied
    if unchanged and all(t >= NEVER_EXIT for t in in_use.thresholds.values()):
        assert exited == 0 and equal == total
