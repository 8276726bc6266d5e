"""Greedy decoding of a causal LM (``model_zoo.llama``) with per-token early exits that keep every KV cache exact.

A ramp is the model's own final norm + LM head on the hidden state after decoder layer ``l`` (1-based), over the
whole vocabulary or a shortlist of it (``RampHead``); its confidence is top-1 minus top-2 probability. A token exits
at the first ramp whose confidence clears that ramp's threshold (``early_exit.exit_rule.exits_at``), at most
``max_consecutive`` times in a row; otherwise it runs to the final layer. Rows decoded together leave a pass together
(``ExitPolicy.partial_exits``).

**Parking.** An exited position has run only ``l`` layers, so layers ``l+1 ..`` lack its keys and values. Its hidden
state is parked and joins the next step's computation at layer ``l+1``: the next token runs layers ``1 .. l`` alone,
then the parked position and the new one run the remaining layers together as one chunk (causal attention inside the
chunk). Every position therefore eventually passes every layer with its real inputs, and every layer's cache holds
exactly what the original model would hold. Parked depths never increase with position (a later position that
exits deeper takes the earlier ones along), so each layer's cache is always a prefix of the sequence and a chunk is
always a run of consecutive positions.

**Verification.** When a parked position reaches the final layer, the original model's token for it is known: the
token it exited with either agrees or not. The default mode streams exited tokens at once and only counts agreement.
``faithful`` mode holds exited tokens back as drafts until they are verified (self-speculative decoding with the ramps
as drafter): the first draft that disagrees is replaced by the original model's token and everything computed after
it is rolled back, so the stream is greedy decoding of the original model (up to floating-point differences between
running a position alone or within a chunk).

**Observations (label-free feedback).** With ``Decoder(observe=p)`` an exit-eligible token (one decoded with the
policy's thresholds in force, i.e. not the prompt's first token nor one forced to full depth by ``max_consecutive``)
is sampled with probability ``p``, independently of its confidences. A sampled token records the confidence and
token of *every* active ramp: the ramps up to its exit are evaluated anyway (that is how it exits); a ramp deeper
than its exit is evaluated when the parked position passes that layer in a later pass (one more LM-head row there,
the only extra cost; none with a single active ramp). When the position reaches the final layer, the original
model's token completes the observation (``Row.observations``). Because every sampled token carries every active
ramp, the sample is unbiased for any thresholds over those ramps. In faithful mode, drafts rolled back after a
wrong draft are never streamed and their observations are dropped with them.

Nothing here knows about Triton: ``triton_backend.llm`` drives one ``Row`` per request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from early_exit.exit_rule import exits_at
from model_zoo.llama import KVCache, Llama, _rotate_half


@dataclass(frozen=True)
class ExitPolicy:
    """Where tokens may exit and how.

    Args:
        thresholds: decoder layer (1 .. num_layers - 1) -> confidence threshold (top-1 minus top-2 probability);
            empty: the vanilla model.
        max_consecutive: exits allowed in a row before a token must run to the final layer.
        faithful: hold exited tokens until the original model confirms them (the stream equals greedy decoding).
        version: the exit configuration it comes from (carried into observations).
        partial_exits: let a row leave a pass that goes on for other rows. Off by default: a pass stops at a ramp
            only when every row in it exits there. Rows decoded together wait for the pass anyway, and a layer costs
            about the same for fewer rows wherever decoding is bound by reading the weights (a CPU, or a GPU below
            its compute limit), so a row leaving alone saves little and risks its agreement (SmolLM2, four streams:
            no saving measurable either way, 98.60 vs 99.90 % token agreement). A single row is unaffected.
    """

    thresholds: dict[int, float] = field(default_factory=dict)
    max_consecutive: int = 3
    faithful: bool = False
    version: int = 0
    partial_exits: bool = False

    def validate(self, num_layers: int) -> None:
        bad = [layer for layer in self.thresholds if not 1 <= layer < num_layers]
        if bad:
            raise ValueError(f"exit layers {sorted(bad)} outside 1..{num_layers - 1}")
        if self.max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {self.max_consecutive}")


@dataclass(frozen=True)
class Token:
    """One generated token: its id, the layer that produced it (num_layers = the final layer) and that layer's
    confidence (top-1 minus top-2 probability)."""

    id: int
    exit: int
    confidence: float


@dataclass
class Observation:
    """One sampled token: confidence and token of every active ramp (decoder layers ``ramps``, ascending) where the
    token passed that layer, the layer that produced it (``exit``; num_layers = final) and the original model's token
    (``final``), under exit configuration ``version``."""

    ramps: tuple[int, ...]
    version: int
    exit: int = 0
    confidence: dict[int, float] = field(default_factory=dict)
    prediction: dict[int, int] = field(default_factory=dict)
    final: int | None = None

    @property
    def complete(self) -> bool:
        return self.final is not None and all(layer in self.confidence for layer in self.ramps)


@dataclass
class _Parked:
    """A position that ran ``depth`` layers: its hidden state, the token it exited with and its observation."""

    hidden: torch.Tensor  # [hidden]
    depth: int
    draft: Token
    observation: Observation | None = None


@dataclass
class DecodeStats:
    """Exited tokens compared with the original model (``agreed + disagreed``) per row."""

    exited: int = 0
    agreed: int = 0
    disagreed: int = 0


@dataclass
class Row:
    """One sequence being generated; its KV cache is freed with it."""

    prompt: list[int]
    max_tokens: int
    eos_token_id: int | None = None
    cache: KVCache | None = None
    parked: list[_Parked] = field(default_factory=list)
    streamed: list[Token] = field(default_factory=list)
    next_input: int | None = None
    consecutive: int = 0
    stats: DecodeStats = field(default_factory=DecodeStats)
    finished: bool = False
    observations: list[Observation] = field(default_factory=list)  # complete ones, for the caller to take

    def release(self) -> None:
        """Free the KV cache and parked states."""
        self.cache = None
        self.parked = []


@dataclass
class _Outcome:
    """What one pass computed: the verdicts on parked positions that reached the final layer (draft, original
    model's token) in position order, and the new position's token (None for a flush) with whether it exited."""

    verdicts: list[tuple[Token, Token]]
    token: Token | None
    exited: bool
    observed: list[Observation | None] = field(default_factory=list)  # per verdict, then the new token if any


@dataclass
class _Chunk:
    """A row's positions within one pass: hidden states ``x`` (``[positions, hidden]``; None until its first
    position joins), parked positions yet to join, those that joined, whether a new position leads it."""

    row: Row
    x: torch.Tensor | None
    remaining: list[_Parked]
    joined: list[_Parked]
    new: bool
    thresholds: dict[int, float]
    observation: Observation | None = None  # of the new position

    @property
    def observations(self) -> list[Observation | None]:
        """Per row of ``x``: the joined positions' observations, then the new position's."""
        return [p.observation for p in self.joined] + ([self.observation] if self.new else [])

    def join(self, index: int) -> None:
        """Before layer ``index`` (0-based): parked positions that ran ``index`` layers join, in front."""
        joining = []
        while self.remaining and self.remaining[-1].depth <= index:
            joining.insert(0, self.remaining.pop())
        if joining:
            states = torch.stack([p.hidden for p in joining])
            self.x = states if self.x is None else torch.cat((states, self.x))
            self.joined = joining + self.joined


def _confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax and top-1 minus top-2 probability over the last dimension."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1)
    return top.indices[..., 0], top.values[..., 0] - top.values[..., 1]


class RampHead:
    """What a ramp computes on a hidden state: the model's final norm and LM head, scored over the whole vocabulary
    or over a shortlist of token ids (``vocabulary``).

    Why a shortlist: the full LM head of a small model is expensive (SmolLM2-135M: 49,152 x 576, the
    multiply-accumulates of eight decoder layers, the time of four on a CPU), and every exit-eligible token pays its
    ramps before it knows whether it exits, so full-vocabulary ramps cost more than the layers they skip. Scored
    over the few thousand tokens the model actually produces, a ramp costs a fraction of one layer. Its confidence
    (top-1 minus top-2 probability within the shortlist) ignores the probability outside it, so it is not the full
    head's confidence; thresholds are tuned on agreement with the original model, which is what makes them
    comparable. A token outside the shortlist can never exit (the ramp
    never predicts it), so its position runs to the final layer, which produces it.
    """

    def __init__(self, model: Llama, vocabulary: torch.Tensor | None = None) -> None:
        self.model = model
        self.vocabulary = None
        self.weight = model.lm_head_weight
        if vocabulary is not None:
            ids = torch.as_tensor(vocabulary, dtype=torch.long).flatten()
            if ids.numel() < 2:
                raise ValueError("a ramp vocabulary needs at least 2 token ids")
            if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
                raise ValueError(f"ramp vocabulary token ids must be in 0..{model.config.vocab_size - 1}")
            if ids.unique().numel() != ids.numel():
                raise ValueError("ramp vocabulary token ids must be distinct")
            self.vocabulary = ids.to(self.weight.device)
            self.weight = self.weight.detach()[self.vocabulary].contiguous()  # a copy: rows read once per ramp call

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and confidences of ``hidden`` ``[n, hidden_size]``."""
        index, confidence = _confidence(torch.nn.functional.linear(self.model.norm(hidden), self.weight))
        return (index if self.vocabulary is None else self.vocabulary[index]), confidence


class Decoder:
    """Greedy decoding with ``policy``'s exits on ``model`` (which it never modifies)."""

    def __init__(self, model: Llama, policy: ExitPolicy | None = None, observe: float = 0.0, seed: int = 0,
                 ramp_head: RampHead | None = None) -> None:
        self.model = model
        self.ramp_head = ramp_head or RampHead(model)
        self.policy = policy or ExitPolicy()
        self.policy.validate(model.config.num_layers)
        if not 0.0 <= observe <= 1.0:
            raise ValueError(f"observe must be in [0, 1], got {observe}")
        self.observe = observe  # share of exit-eligible tokens observed for feedback
        self._sampler = random.Random(seed)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    def start(self, prompt: list[int], max_tokens: int, eos_token_id: int | None = None) -> Row:
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        limit = self.model.config.max_positions
        if len(prompt) + max_tokens > limit:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the model's "
                             f"{limit} positions")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        return Row(list(prompt), max_tokens, eos_token_id)

    # --- the request-level loop ----------------------------------------------------------------------------------

    def step(self, row: Row, policy: ExitPolicy | None = None) -> list[Token]:
        """Advance ``row`` by one pass and return the tokens to stream now (none, one, or several verified drafts).

        ``policy`` overrides the decoder's for this step (a hot-reloaded configuration); ``faithful`` and
        ``max_consecutive`` always come from it too. Once ``row.finished``, call ``settle`` (after the last token
        went out: it is not on the stream's path).
        """
        return self.step_many([row], policy)[0]

    @torch.inference_mode()
    def step_many(self, rows: list[Row], policy: ExitPolicy | None = None) -> list[list[Token]]:
        """``step`` for several rows at once (continuous batching): one pass in which the rows' tokens share every
        matrix multiplication (projections, MLP, LM head), attention running per row on its own cache. A row joins
        with its prompt (prefill), its next token, or only its parked drafts (a faithful flush); a row leaves the pass
        at the layer where it exits. Returns each row's tokens to stream, in order."""
        policy = policy or self.policy
        work: list[tuple[Row, list[int] | None, dict[int, float], Observation | None]] = []
        for row in rows:
            if row.finished:
                continue
            if row.cache is None:  # prefill: the whole prompt, full depth
                row.cache = self.model.new_cache()
                work.append((row, row.prompt, {}, None))
                continue
            drafts = [p.draft for p in row.parked] if policy.faithful else []  # held back, not streamed yet
            if drafts and (len(row.streamed) + len(drafts) >= row.max_tokens or drafts[-1].id == row.eos_token_id):
                work.append((row, None, {}, None))  # verify the drafts before going on
                continue
            thresholds = policy.thresholds if row.consecutive < policy.max_consecutive else {}
            observation = None
            if thresholds and self.observe and self._sampler.random() < self.observe:
                observation = Observation(tuple(sorted(thresholds)), policy.version)
            work.append((row, [row.next_input], thresholds, observation))
        outcomes = self._pass_many(work, policy.partial_exits) if work else []
        streamed = {id(row): self._accept(row, out, policy) for (row, *_), out in zip(work, outcomes)}
        return [streamed.get(id(row), []) for row in rows]

    def _accept(self, row: Row, out: _Outcome, policy: ExitPolicy) -> list[Token]:
        """Apply one pass's outcome to ``row``; returns what to stream now."""
        self._take_observations(row, out, policy.faithful)
        stream: list[Token] = []
        for index, (draft, original) in enumerate(out.verdicts):
            if draft.id == original.id:
                row.stats.agreed += 1
                if policy.faithful:
                    stream.append(draft)
                continue
            row.stats.disagreed += 1
            if policy.faithful:
                stream.append(original)
                # Everything computed after this position followed a wrong draft: drop it from every layer (a pass
                # that verifies ran to the final layer, so every layer holds the same positions).
                later = len(out.verdicts) - index - 1 + (out.token is not None)
                self._truncate(row, self._cache_length(row, 0) - later)
                row.parked = []
                row.next_input = original.id
                row.consecutive = 0
                return self._emit(row, stream)
        if out.token is not None:
            row.next_input = out.token.id
            if out.exited:
                row.stats.exited += 1
                row.consecutive += 1
            if not (out.exited and policy.faithful):  # a faithful draft streams once verified
                stream.append(out.token)
        if not out.exited:
            row.consecutive = 0
        return self._emit(row, stream)

    @staticmethod
    def _take_observations(row: Row, out: _Outcome, faithful: bool) -> None:
        """Move the observations ``out`` completed to ``row.observations``: those of the verified positions and of a
        new token that ran to the final layer (an exited one's completes when it gets there); in faithful mode none
        after a wrong draft, whose followers are rolled back unstreamed."""
        if not out.observed:
            return
        count = len(out.verdicts)
        kept = list(out.observed[:count])
        wrong = next((i for i, (draft, original) in enumerate(out.verdicts) if draft.id != original.id), None)
        if faithful and wrong is not None:
            kept = kept[:wrong + 1]
        elif out.token is not None and not out.exited:
            kept.append(out.observed[count])
        row.observations += [o for o in kept if o is not None]

    def _emit(self, row: Row, stream: list[Token]) -> list[Token]:
        row.streamed += stream
        streamed = row.streamed
        if len(streamed) >= row.max_tokens or (streamed and streamed[-1].id == row.eos_token_id):
            row.finished = True
        return stream

    @torch.inference_mode()
    def settle(self, row: Row) -> None:
        """Free a finished (or abandoned) row; positions still parked first run to the final layer once, so every
        exit that was streamed is checked against the original model (``row.stats``)."""
        if row.finished and row.parked and row.cache is not None:
            out = self._pass(row, None, {})
            for draft, original in out.verdicts:
                if draft.id == original.id:
                    row.stats.agreed += 1
                else:
                    row.stats.disagreed += 1
            row.observations += [o for o in out.observed if o is not None]
        row.release()

    # --- one pass over the layers --------------------------------------------------------------------------------

    @staticmethod
    def _cache_length(row: Row, layer: int) -> int:
        keys = row.cache.keys[layer]
        return 0 if keys is None else keys.shape[2]

    @staticmethod
    def _truncate(row: Row, length: int) -> None:
        cache = row.cache
        for layer in range(len(cache.keys)):
            if cache.keys[layer] is not None:
                cache.keys[layer] = cache.keys[layer][:, :, :length]
                cache.values[layer] = cache.values[layer][:, :, :length]

    def _pass(self, row: Row, new_ids: list[int] | None, thresholds: dict[int, float]) -> _Outcome:
        return self._pass_many([(row, new_ids, thresholds, None)])[0]

    def _pass_many(self, work: list[tuple[Row, list[int] | None, dict[int, float], Observation | None]],
                   partial_exits: bool = True) -> list[_Outcome]:
        """Run each row's ``new_ids`` (None: no new position, a flush) through the layers, taking its parked positions
        along from the layer after their depth; a row stops at the first ramp of its thresholds that its last
        position clears (without ``partial_exits``: only when every row still in the pass stops there too)."""
        model = self.model
        device = model.embed_tokens.weight.device
        chunks = [_Chunk(row, None if ids is None else model.embed_tokens(torch.tensor(ids, device=device)),
                         list(row.parked), [], ids is not None, thresholds, observation)
                  for row, ids, thresholds, observation in work]
        outcomes: list[_Outcome | None] = [None] * len(chunks)
        for index, layer in enumerate(model.layers):
            live = []
            for k, chunk in enumerate(chunks):
                if outcomes[k] is not None:
                    continue
                chunk.join(index)
                if chunk.x is not None:
                    live.append(k)
            if not live:
                continue
            self._layer(layer, index, [chunks[k] for k in live])
            self._ramps(index + 1, chunks, live, outcomes, partial_exits)
        self._run_out(chunks, outcomes)
        return [out if out is not None else _Outcome([], None, False) for out in outcomes]

    def _ramps(self, depth: int, chunks: list[_Chunk], live: list[int], outcomes: list[_Outcome | None],
               partial_exits: bool) -> None:
        """The ramp after layer ``depth`` where it is asked (new positions: exit or go on) or observed (positions
        sampled for feedback that pass it for the first time), all in one LM-head call."""
        asking = [k for k in live if chunks[k].new and depth in chunks[k].thresholds and depth < self.num_layers]
        # Observed positions passing an active ramp they were not evaluated at yet (exited earlier, now deferred).
        observing = [(k, i, o) for k in live for i, o in enumerate(chunks[k].observations)
                     if o is not None and depth in o.ramps and depth not in o.confidence
                     and not (k in asking and i == chunks[k].x.shape[0] - 1)]
        if not asking and not observing:
            return
        states = [chunks[k].x[-1] for k in asking] + [chunks[k].x[i] for k, i, _ in observing]
        token_ids, confidence = self.ramp_head(torch.stack(states))
        for j, (_, _, observation) in enumerate(observing, start=len(asking)):
            observation.confidence[depth] = float(confidence[j])
            observation.prediction[depth] = int(token_ids[j])
        clears = [bool(exits_at(np.float32(confidence[j].item()), chunks[k].thresholds[depth]))
                  for j, k in enumerate(asking)]
        if not partial_exits:  # the pass stops here for every row still in it, or for none
            pending = [k for k, out in enumerate(outcomes) if out is None]
            leaving = {k for k, clear in zip(asking, clears) if clear}
            clears = [clear and leaving.issuperset(pending) for clear in clears]
        for j, k in enumerate(asking):
            chunk = chunks[k]
            if chunk.observation is not None:
                chunk.observation.confidence[depth] = float(confidence[j])
                chunk.observation.prediction[depth] = int(token_ids[j])
            if clears[j]:
                draft = Token(int(token_ids[j]), depth, float(confidence[j]))
                drafts = [p.draft for p in chunk.joined] + [draft]
                if chunk.observation is not None:
                    chunk.observation.exit = depth
                observations = chunk.observations
                chunk.row.parked = chunk.remaining + [_Parked(chunk.x[i], depth, drafts[i], observations[i])
                                                      for i in range(chunk.x.shape[0])]
                outcomes[k] = _Outcome([], draft, True)

    def _run_out(self, chunks: list[_Chunk], outcomes: list[_Outcome | None]) -> None:
        """The final layer's tokens for every chunk that did not exit: the original model's verdict on each joined
        draft and the new position's token."""
        deep = [k for k, out in enumerate(outcomes) if out is None and chunks[k].x is not None]
        if not deep:
            return
        token_ids, confidence = _confidence(self.model.exit_logits(torch.cat([chunks[k].x for k in deep])))
        offset = 0
        for k in deep:
            chunk = chunks[k]
            size = chunk.x.shape[0]
            originals = [Token(int(t), self.num_layers, float(c))
                         for t, c in zip(token_ids[offset:offset + size], confidence[offset:offset + size])]
            offset += size
            chunk.row.parked = []
            verdicts = [(p.draft, originals[j]) for j, p in enumerate(chunk.joined)]
            observed = chunk.observations
            for j, observation in enumerate(observed):
                if observation is not None:
                    observation.final = originals[j].id
            if chunk.observation is not None:
                chunk.observation.exit = self.num_layers
            outcomes[k] = _Outcome(verdicts, originals[-1] if chunk.new else None, False, observed)

    def _layer(self, layer: torch.nn.Module, index: int, chunks: list[_Chunk]) -> None:
        """Decoder layer ``index`` on every chunk: the rows' positions packed into one sequence for the norms,
        projections and MLP; rotary embedding, KV cache and attention per row (``model_zoo.llama.Attention``'s
        arithmetic, on each row's own cache and positions)."""
        model = self.model
        attn = layer.self_attn
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        sizes = [chunk.x.shape[0] for chunk in chunks]
        x = torch.cat([chunk.x for chunk in chunks])[None]  # [1, positions, hidden]
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        outputs, offset = [], 0
        for chunk, n in zip(chunks, sizes):
            part = slice(offset, offset + n)
            offset += n
            qr = q[:, part].view(1, n, heads, head_dim).transpose(1, 2)
            kr = k[:, part].view(1, n, kv_heads, head_dim).transpose(1, 2)
            vr = v[:, part].view(1, n, kv_heads, head_dim).transpose(1, 2)
            past = self._cache_length(chunk.row, index)
            cos, sin = model._rope(past, n, x.device)
            qr = qr * cos + _rotate_half(qr) * sin
            kr = kr * cos + _rotate_half(kr) * sin
            kr, vr = chunk.row.cache.update(index, kr, vr)
            kr = kr.repeat_interleave(heads // kv_heads, dim=1)
            vr = vr.repeat_interleave(heads // kv_heads, dim=1)
            mask = None
            if n > 1:
                mask = torch.arange(kr.shape[2], device=x.device)[None, :] <= torch.arange(past, past + n,
                                                                                           device=x.device)[:, None]
            out = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
            outputs.append(out.transpose(1, 2).reshape(1, n, heads * head_dim))
        x = x + attn.o_proj(torch.cat(outputs, dim=1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        offset = 0
        for chunk, n in zip(chunks, sizes):
            chunk.x = x[0, offset:offset + n]
            offset += n

    # --- whole sequences (tests, tools) ---------------------------------------------------------------------------

    def generate(self, prompt: list[int], max_tokens: int, eos_token_id: int | None = None) -> Row:
        """Run one row to the end; returns it (``streamed`` tokens, ``stats``)."""
        row = self.start(prompt, max_tokens, eos_token_id)
        while not row.finished:
            self.step(row)
        self.settle(row)
        return row
