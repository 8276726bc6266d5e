"""Early-exit greedy decoding (early_exit.llm_decoding) on the tiny random Llama: exits, parking, verification."""

from __future__ import annotations

import pytest
import torch

from early_exit.llm_decoding import Decoder, ExitPolicy, RampHead
from model_zoo.llama import Llama, init_random, tiny_config

LAYERS = tiny_config().num_layers
ALWAYS = {1: 0.0, 2: 0.0}  # every ramp clears a threshold of 0: tokens exit whenever the cap allows


@pytest.fixture(scope="module")
def tiny() -> Llama:
    return init_random(Llama(tiny_config()), seed=0)


@pytest.fixture(scope="module")
def shallow_equals_deep() -> Llama:
    """A tiny model whose last layer adds nothing (zero output projections): the ramp after layer 2 is the model's
    own head, so every draft exited there agrees with the original model."""
    model = init_random(Llama(tiny_config()), seed=3)
    with torch.no_grad():
        model.layers[-1].self_attn.o_proj.weight.zero_()
        model.layers[-1].mlp.down_proj.weight.zero_()
    return model


def _prompts(count: int = 4, length: int = 5) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, tiny_config().vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


def _greedy(model: Llama, prompt: list[int], tokens: int) -> list[int]:
    return model.generate(torch.tensor([prompt]), tokens)


def _cache_matches_full_forward(model: Llama, decoder: Decoder, prompt: list[int], tokens: int) -> None:
    """Run a row, snapshotting its KV cache whenever nothing is parked: it must equal a fresh forward pass over the
    same sequence (every layer computed every position with its real inputs)."""
    row = decoder.start(prompt, tokens)
    checked = 0
    while not row.finished:
        decoder.step(row)
        if row.finished or row.parked:
            continue
        sequence = row.prompt + [t.id for t in row.streamed][:-1]
        reference = model.new_cache()
        with torch.inference_mode():
            model(torch.tensor([sequence]), reference)
        for layer in range(LAYERS):
            assert row.cache.keys[layer].shape == reference.keys[layer].shape
            torch.testing.assert_close(row.cache.keys[layer], reference.keys[layer], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(row.cache.values[layer], reference.values[layer], rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked >= 2


def test_vanilla_decoder_is_greedy_decoding(tiny: Llama) -> None:
    decoder = Decoder(tiny)
    for prompt in _prompts():
        row = decoder.generate(prompt, 12)
        assert [t.id for t in row.streamed] == _greedy(tiny, prompt, 12)
        assert all(t.exit == LAYERS and 0.0 <= t.confidence <= 1.0 for t in row.streamed)
        assert row.stats.exited == 0 and row.cache is None  # finished rows free their cache


def test_default_mode_exits_stream_at_once_and_count_agreement(tiny: Llama) -> None:
    decoder = Decoder(tiny, ExitPolicy(ALWAYS, max_consecutive=3))
    row = decoder.generate(_prompts()[0], 16)
    exits = [t.exit for t in row.streamed]
    assert len(exits) == 16
    assert exits[0] == LAYERS  # the prefill runs full depth
    assert exits.count(1) > 0  # threshold 0: the first ramp always answers when allowed
    # at most three exits in a row, then a full-depth token
    run = 0
    for layer in exits:
        run = run + 1 if layer < LAYERS else 0
        assert run <= 3
    # every exited token is eventually compared with the original model (the last ones by a final flush)
    assert row.stats.exited == exits.count(1) + exits.count(2)
    assert row.stats.agreed + row.stats.disagreed == row.stats.exited


@pytest.mark.parametrize("cap", [1, 3])
def test_parked_positions_leave_every_kv_cache_exact(tiny: Llama, cap: int) -> None:
    """Thresholds at two depths: parked positions of different depths join the next pass at the right layer."""
    _cache_matches_full_forward(tiny, Decoder(tiny, ExitPolicy({1: 0.3, 2: 0.0}, max_consecutive=cap)),
                                _prompts()[1], 14)


def test_default_mode_continues_its_own_sequence_exactly(tiny: Llama) -> None:
    """Whatever the ramps say, the streamed sequence is what the original model computes on it: each full-depth
    token is the original model's greedy choice after the (possibly exited) tokens before it."""
    decoder = Decoder(tiny, ExitPolicy({1: 0.2, 2: 0.0}, max_consecutive=2))
    prompt = _prompts()[2]
    row = decoder.generate(prompt, 15)
    ids = [t.id for t in row.streamed]
    with torch.inference_mode():
        logits = tiny(torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1:]
    for position, token in enumerate(row.streamed):
        if token.exit == LAYERS:
            assert int(logits[position].argmax()) == token.id


@pytest.mark.parametrize("thresholds", [ALWAYS, {2: 0.0}, {1: 0.5, 2: 0.1}])
@pytest.mark.parametrize("cap", [1, 3])
def test_faithful_mode_streams_exactly_greedy_decoding(tiny: Llama, thresholds: dict[int, float], cap: int) -> None:
    decoder = Decoder(tiny, ExitPolicy(thresholds, max_consecutive=cap, faithful=True))
    disagreed = 0
    for prompt in _prompts():
        row = decoder.generate(prompt, 12)
        assert [t.id for t in row.streamed] == _greedy(tiny, prompt, 12)
        disagreed += row.stats.disagreed
        assert row.stats.agreed == sum(t.exit < LAYERS for t in row.streamed)  # streamed exits are verified ones
    if thresholds is ALWAYS:
        assert disagreed > 0  # the random model's ramps are often wrong: the rollback path ran


def test_faithful_rollback_leaves_the_cache_exact(tiny: Llama) -> None:
    _cache_matches_full_forward(tiny, Decoder(tiny, ExitPolicy(ALWAYS, max_consecutive=3, faithful=True)),
                                _prompts()[3], 12)


def test_faithful_mode_streams_verified_exits(shallow_equals_deep: Llama) -> None:
    model = shallow_equals_deep
    decoder = Decoder(model, ExitPolicy({2: 0.0}, max_consecutive=3, faithful=True))
    prompt = _prompts()[0]
    row = decoder.generate(prompt, 13)
    assert [t.id for t in row.streamed] == _greedy(model, prompt, 13)
    exits = [t.exit for t in row.streamed]
    assert exits == [3] + [2, 2, 2, 3] * 3  # prefill, then three drafts and the verifying full-depth token
    assert row.stats.disagreed == 0 and row.stats.agreed == 9


def test_ramp_head_over_a_shortlist_scores_only_its_tokens(tiny: Llama) -> None:
    hidden = torch.randn(6, tiny_config().hidden_size, generator=torch.Generator().manual_seed(1))
    full_ids, full_confidence = RampHead(tiny)(hidden)
    with torch.inference_mode():
        logits = tiny.exit_logits(hidden)
    assert torch.equal(full_ids, logits.argmax(-1))
    # every token listed (in another order): the same answers as the full head
    everything = torch.randperm(tiny_config().vocab_size, generator=torch.Generator().manual_seed(2))
    ids, confidence = RampHead(tiny, everything)(hidden)
    assert torch.equal(ids, full_ids)
    torch.testing.assert_close(confidence, full_confidence)
    # a shortlist: the argmax among its own logits, a softmax over them alone
    shortlist = torch.tensor([5, 17, 3, 40, 60])
    ids, confidence = RampHead(tiny, shortlist)(hidden)
    assert torch.equal(ids, shortlist[logits[:, shortlist].argmax(-1)])
    top = torch.softmax(logits[:, shortlist], -1).topk(2).values
    torch.testing.assert_close(confidence, top[:, 0] - top[:, 1])
    for bad in ([3], [3, 3], [0, tiny_config().vocab_size]):
        with pytest.raises(ValueError, match="ramp vocabulary"):
            RampHead(tiny, torch.tensor(bad))


def test_shortlist_ramps_exit_only_with_their_tokens_and_keep_caches_exact(tiny: Llama) -> None:
    """A shortlist changes what ramps can say, not how positions are parked and verified."""
    shortlist = torch.arange(0, tiny_config().vocab_size, 2)  # even token ids
    policy = ExitPolicy(ALWAYS, max_consecutive=3)
    row = Decoder(tiny, policy, ramp_head=RampHead(tiny, shortlist)).generate(_prompts()[0], 16)
    exited = [t.id for t in row.streamed if t.exit < LAYERS]
    assert exited and all(token % 2 == 0 for token in exited)
    _cache_matches_full_forward(tiny, Decoder(tiny, policy, ramp_head=RampHead(tiny, shortlist)), _prompts()[1], 14)
    faithful = Decoder(tiny, ExitPolicy(ALWAYS, max_consecutive=3, faithful=True), ramp_head=RampHead(tiny, shortlist))
    prompt = _prompts()[2]
    assert [t.id for t in faithful.generate(prompt, 12).streamed] == _greedy(tiny, prompt, 12)


def test_eos_stops_the_row(tiny: Llama) -> None:
    prompt = _prompts()[0]
    tokens = _greedy(tiny, prompt, 8)
    eos = tokens[4]
    stop = tokens.index(eos) + 1
    for policy in (ExitPolicy(), ExitPolicy(ALWAYS, faithful=True)):
        row = Decoder(tiny, policy).generate(prompt, 8, eos_token_id=eos)
        assert [t.id for t in row.streamed] == tokens[:stop]


def test_requests_are_validated(tiny: Llama) -> None:
    decoder = Decoder(tiny)
    with pytest.raises(ValueError, match="positions"):
        decoder.start([1, 2, 3], tiny.config.max_positions)
    with pytest.raises(ValueError, match="token ids"):
        decoder.start([tiny.config.vocab_size], 4)
    with pytest.raises(ValueError):
        decoder.start([], 4)
    with pytest.raises(ValueError, match="exit layers"):
        Decoder(tiny, ExitPolicy({LAYERS: 0.5}))


def test_rows_are_independent(tiny: Llama) -> None:
    """Interleaving steps of several rows (how the backend serves concurrent requests) changes nothing."""
    decoder = Decoder(tiny, ExitPolicy(ALWAYS, faithful=True))
    prompts = _prompts()
    rows = [decoder.start(prompt, 10) for prompt in prompts]
    while not all(row.finished for row in rows):
        for row in rows:
            decoder.step(row)
    for prompt, row in zip(prompts, rows):
        assert [t.id for t in row.streamed] == _greedy(tiny, prompt, 10)


# --- the backend's Triton-free parts (triton_backend.llm_setup) -----------------------------------------------------


def test_sampling_parameters_accept_only_greedy_decoding() -> None:
    from triton_backend.llm_setup import DEFAULT_MAX_TOKENS, RequestError, max_tokens_of

    assert max_tokens_of(b'{"max_tokens": 5, "temperature": 0}') == 5
    assert max_tokens_of({"max_tokens": 7}) == 7
    assert max_tokens_of(None) == max_tokens_of("") == max_tokens_of("{}") == DEFAULT_MAX_TOKENS
    for bad, message in [('{"temperature": 0.7}', "temperature must be 0"), ('{"n": 2}', "n must be 1"),
                         ('{"max_tokens": 0}', "max_tokens"), ('{"max_tokens": "5"}', "max_tokens"),
                         ("[1]", "JSON object"), ("{", "not JSON")]:
        with pytest.raises(RequestError, match=message):
            max_tokens_of(bad)


def test_settings_from_parameters() -> None:
    from triton_backend.llm_setup import LLMSettings

    settings = LLMSettings.from_parameters({"model": "tiny:1", "exits": "1:0.5, 2:0", "mode": "faithful",
                                            "max_consecutive_exits": "2"})
    assert settings.policy == ExitPolicy({1: 0.5, 2: 0.0}, max_consecutive=2, faithful=True)
    assert settings.hot_reload  # exits configured: follow Redis unless told otherwise
    vanilla = LLMSettings.from_parameters({"model": "tiny:1"})
    assert vanilla.policy.thresholds == {} and not vanilla.hot_reload and not vanilla.faithful
    assert not LLMSettings.from_parameters({"model": "tiny:1", "exits": "1:0.5", "hot_reload": "false"}).hot_reload
    partial = LLMSettings.from_parameters({"model": "tiny:1", "exits": "1:0.5", "partial_exits": "true"})
    assert partial.policy_for({2: 0.25}, version=4) == ExitPolicy({2: 0.25}, version=4, partial_exits=True)
    for bad in ({}, {"model": "tiny:1", "exits": "1=0.5"}, {"model": "tiny:1", "mode": "fast"}):
        with pytest.raises(ValueError):
            LLMSettings.from_parameters(bad)


def test_tiny_source_and_character_tokenizer(tiny: Llama) -> None:
    from triton_backend.llm_setup import CharTokenizer, load_llm

    model, tokenizer = load_llm("tiny:0")
    assert model.config.vocab_size == CharTokenizer.vocab_size
    for name, value in tiny.state_dict().items():  # same seed, same weights as the unit tests' model
        assert torch.equal(model.state_dict()[name], value)
    text = "Hello,\tworld!\n~"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode("é")) == "?"
    assert sorted(tokenizer.encode(tokenizer.decode(list(range(97))))) == list(range(97))


def test_repository_entries(tmp_path) -> None:
    from triton_backend.llm_setup import write_entries

    names = write_entries(tmp_path, "lm", {"model": "tiny:0", "exits": "2:0.9", "mode": "faithful"})
    assert names == ["lm", "lm_vanilla"]
    early, vanilla = ((tmp_path / n / "config.pbtxt").read_text() for n in names)
    for text in (early, vanilla):
        assert 'backend: "apparate_llm"' in text and "decoupled: true" in text and (tmp_path / "lm" / "1").is_dir()
    assert '"exits"' in early and '"exits"' not in vanilla and '"mode"' not in vanilla


@pytest.mark.parametrize("faithful", [False, True])
def test_continuous_batching_equals_rows_alone(tiny: Llama, faithful: bool) -> None:
    """Rows stepped together (joining at different times, so prefills, single tokens, parked chunks and flushes of
    different lengths share passes) give each row what it gets alone: tokens, exit layers, agreement counts, when
    each row may leave a pass on its own (``partial_exits``)."""
    decoder = Decoder(tiny, ExitPolicy({1: 0.3, 2: 0.0}, max_consecutive=3, faithful=faithful, partial_exits=True))
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 97, (length,), generator=generator).tolist() for length in (3, 9, 5, 1, 7)]
    budgets = [14, 6, 20, 11, 9]
    alone = [decoder.generate(p, m) for p, m in zip(prompts, budgets)]
    rows, step = [], 0
    while len(rows) < len(prompts) or not all(row.finished for row in rows):
        if step % 2 == 0 and len(rows) < len(prompts):  # a new request arrives every other step
            rows.append(decoder.start(prompts[len(rows)], budgets[len(rows)]))
        decoder.step_many(rows)
        for row in rows:
            if row.finished:
                decoder.settle(row)
        step += 1
    for single, batched in zip(alone, rows):
        assert [(t.id, t.exit) for t in batched.streamed] == [(t.id, t.exit) for t in single.streamed]
        for a, b in zip(batched.streamed, single.streamed):
            assert a.confidence == pytest.approx(b.confidence, abs=1e-5)
        assert batched.stats == single.stats
        assert batched.cache is None
    if faithful:
        for prompt, budget, row in zip(prompts, budgets, rows):
            assert [t.id for t in row.streamed] == _greedy(tiny, prompt, budget)


def test_a_pass_stops_only_where_every_row_in_it_exits(tiny: Llama) -> None:
    """By default a row does not leave a pass the other rows continue (it would wait for them anyway): a decoding
    row whose ramp clears its threshold runs on while another row's prefill shares the pass, and exits once the
    pass is its own."""
    for partial in (False, True):
        decoder = Decoder(tiny, ExitPolicy({1: 0.0}, max_consecutive=1, partial_exits=partial))
        first = decoder.start(_prompts()[0], 8)
        decoder.step(first)  # prefill alone
        second = decoder.start(_prompts()[1], 8)
        together = decoder.step_many([first, second])  # first asks its ramp; second's prefill runs full depth
        assert together[0][0].exit == (1 if partial else LAYERS) and together[1][0].exit == LAYERS
        alone = decoder.step(first)  # then first alone again: the cap of one exit in a row allows one now
        assert alone[0].exit == (LAYERS if partial else 1)
    # rows that all clear the ramp leave the pass together
    decoder = Decoder(tiny, ExitPolicy({1: 0.0}, max_consecutive=1))
    rows = [decoder.start(p, 8) for p in _prompts()[:3]]
    decoder.step_many(rows)
    assert all(tokens[0].exit == 1 for tokens in decoder.step_many(rows))
