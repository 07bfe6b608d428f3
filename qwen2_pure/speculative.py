"""Speculative decoding: cheap guesses of the next tokens, checked by the model in one forward.

A decode step of one sequence is bound by reading the weights (a CPU, or a GPU at batch 1), so the model
runs on k + 1 tokens for little more than the price of one. Speculative decoding guesses k tokens cheaply,
runs the model (the *target*) once on [last token, guess_1 .. guess_k] at cache slots t .. t + k, and keeps
the guesses the target agrees with, plus one token of the target's own: 1 to k + 1 tokens per target forward.

Two proposers, under transformers' names:

- `PromptLookup(num_tokens, max_ngram_size=2)` — `generate(..., prompt_lookup_num_tokens=N)`: the last n
  tokens of the sequence (n = 2, then 1) are looked up earlier in prompt + generated text, and the up to N
  tokens that followed the first match are the guesses. Free to compute; strong wherever the answer copies
  its prompt (rewriting code with a small change, quoting a document). transformers'
  `PromptLookupCandidateGenerator` (generation/candidate_generator.py) is the reference: same n-gram sizes
  (`max_matching_ngram_size` 2), matches scanned left to right, the first with a continuation wins, the
  continuation cut before the first stop token.
- `DraftModel(model, num_assistant_tokens=5)` — `generate(..., assistant_model=draft)`: a smaller Qwen2/2.5
  of the same tokenizer decodes k tokens greedily (or samples them, when the target samples) with its own
  KV cache. The cache keeps the token ids whose keys it holds; each proposal feeds only what differs from
  the sequence (the prompt the first time, then the tokens the target emitted), so a rejection needs no
  rewind: the stale slots are overwritten later. (transformers' `num_assistant_tokens` defaults to 20 with
  its "constant" schedule; 5 suits a CPU, where the draft's own steps are not free.)

Verification (`speculative_step`), with the target's logits for every position run through the row's own
penalties and warpers, in order (a repetition penalty at position i depends on the guesses before i):

- greedy: accept the longest run of guesses equal to the target's argmax, then the target's argmax at the
  first mismatch (or after the last guess). The tokens are those of plain greedy decoding, up to the
  rounding differences of one forward over k + 1 tokens against k + 1 forwards over one.
- sampling: the rule of Leviathan et al. 2023 (Alg. 1) and Chen et al. 2023, transformers'
  `_speculative_sampling`: accept guess x with probability min(1, p(x) / q(x)); at the first rejection draw
  from norm(max(0, p - q)) and stop; after k acceptances draw one more token from p. Every emitted token is
  then distributed as the target's p. A prompt-lookup guess is deterministic (q is one-hot at x): accept with
  probability p(x), else draw from p with x removed.
- vocabularies: a draft and a target of one tokenizer may have different row counts (Qwen2.5 0.5B-3B have
  151,936 rows, 7B and larger 152,064; the rows past 151,665 are padding). Guesses are drawn from the rows
  both have, q is 0 beyond them, so the rule above stays exact for the target's full distribution. An id the
  draft has no row for is fed to it as its pad id: its guesses may suffer, never the output.

Scope: the engine speculates only while exactly one sequence runs (`generate` with one prompt,
`stream_text`, the chat command, the server while it serves one request); with more rows it takes plain
batched steps, which already use the weights they read for several tokens (vLLM, too, turns speculation
off above a batch size). Each emitted token goes through the engine's per-token path (`Engine._advance`):
text, stop strings, stop ids and `max_new_tokens` act inside an accepted run exactly as in plain steps, and
the tokens after a stop are dropped.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .cache import KVCache
from .engine import StepOutput, _describe
from .errors import Qwen2PureError
from .sampling import SamplingParams, process_logits

__all__ = ["DraftModel", "PromptLookup", "Proposer", "accept_or_resample", "make_speculator", "prompt_lookup",
           "speculative_step"]


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise Qwen2PureError(f"{name}={value!r} is invalid: it must be an integer >= 1")
    return value


# ---- proposers ----------------------------------------------------------------------------------------------

def prompt_lookup(tokens: Sequence[int], num_tokens: int, max_ngram_size: int = 2,
                  stop_ids: frozenset = frozenset()) -> list[int]:
    """Guesses for what follows `tokens`: for n = max_ngram_size .. 1, the first earlier occurrence (left to
    right) of the last n tokens that has a continuation gives up to `num_tokens` of the tokens after it, cut
    before the first stop id. [] when nothing matches. transformers' PromptLookupCandidateGenerator.get_candidates."""
    length = len(tokens)
    for n in range(min(max_ngram_size, length - 1), 0, -1):
        tail = list(tokens[length - n:])
        first = tail[0]
        # windows start at i = 0 .. length - n - 1 (the last window is the tail itself, without a continuation)
        for i in range(length - n):
            if tokens[i] == first and list(tokens[i:i + n]) == tail:
                guess = list(tokens[i + n:i + n + num_tokens])
                for j, tok in enumerate(guess):
                    if tok in stop_ids:
                        return guess[:j]
                return guess
    return []


class Proposer:
    """What `Engine(speculator=)` takes: `num_tokens`, `propose(...)`, and `step(engine)`, which the engine calls
    instead of a plain step while one sequence runs (so the engine needs no import of this module)."""

    num_tokens: int

    def step(self, engine) -> Optional[list[StepOutput]]:
        return speculative_step(engine, engine.rows[0], self)


class PromptLookup(Proposer):
    """Guesses copied from earlier in the sequence (`prompt_lookup`); deterministic, so q is one-hot."""

    def __init__(self, num_tokens: int = 10, max_ngram_size: int = 2):
        self.num_tokens = _positive_int("prompt_lookup_num_tokens", num_tokens)
        self.max_ngram_size = _positive_int("max_ngram_size", max_ngram_size)

    def propose(self, tokens: list[int], k: int, *, stop_ids: frozenset, **_) -> tuple[list[int], None]:
        return prompt_lookup(tokens, k, self.max_ngram_size, stop_ids), None

    def __repr__(self) -> str:
        return f"PromptLookup(num_tokens={self.num_tokens}, max_ngram_size={self.max_ngram_size})"


class DraftModel(Proposer):
    """A small model of the same tokenizer guesses `num_assistant_tokens` tokens per step, with its own KV
    cache of one row (slot = position). `cached` holds the ids whose keys the cache holds; a proposal feeds the
    sequence from the first id that differs, so rejections, a new sequence or a whole new generation need no
    reset (a shared prompt prefix is even reused). Not thread-safe: one engine drives it at a time."""

    def __init__(self, model, num_assistant_tokens: int = 5):
        if not hasattr(model, "config") or not hasattr(model, "new_cache"):
            raise Qwen2PureError(f"assistant_model must be a qwen2_pure Qwen2ForCausalLM (qwen2_pure.load_model), "
                                 f"got {type(model).__name__}")
        self.model = model
        self.num_tokens = _positive_int("num_assistant_tokens", num_assistant_tokens)
        self.cache = None
        self.cached: list[int] = []

    def _ensure_cache(self, slots: int) -> None:
        if self.cache is None or self.cache.max_len < slots:
            self.cache = self.model.new_cache(1, slots)
            self.cached = []

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, *, params: SamplingParams, generator: Optional[torch.Generator],
                stop_ids: frozenset, vocab_size: int, max_len: int) -> tuple[list[int], Optional[torch.Tensor]]:
        """Up to k guesses for what follows `tokens`, and (when sampling) the distributions q (k', vocab_size)
        they were drawn from, 0 past the rows draft and target share. ([], None) past the draft's context."""
        draft_vocab, context = self.model.config.vocab_size, self.model.config.max_position_embeddings
        n = len(tokens)
        k = min(k, context - n + 1)  # guesses 1 .. k-1 are fed at positions n .. n+k-2
        if k < 1:
            return [], None
        self._ensure_cache(min(context, max(max_len, n + k)))
        m = 0  # ids already cached: the common prefix, less the last token, whose logits we need
        for a, b in zip(self.cached, tokens[:n - 1]):
            if a != b:
                break
            m += 1
        feed = tokens[m:]
        device = self.model.device
        common = min(draft_vocab, vocab_size)
        logits = self._forward(feed, m, device)
        self.cached = self.cached[:m] + list(feed)
        guesses, qs = [], []
        for i in range(k):
            x, q = self._choose(logits[:, :common], params, generator, vocab_size)
            guesses.append(x)
            qs.append(q)
            if x in stop_ids or i == k - 1:
                break
            logits = self._forward([x], n + i, device)
            self.cached.append(x)
        return guesses, None if params.greedy else torch.cat(qs)

    def _forward(self, ids: list[int], start: int, device) -> torch.Tensor:
        """The draft's fp32 logits (1, V_draft) after feeding `ids` at slots/positions start .. start+len-1.
        An id past the draft's rows (a target row it lacks: padding, for Qwen) is fed as the draft's pad id."""
        end = start + len(ids)
        rows = self.model.config.vocab_size
        if max(ids) >= rows:
            pad = self.model.generation_config.pad_token_id
            pad = pad if pad is not None and pad < rows else 0
            ids = [t if t < rows else pad for t in ids]
        return self.model(torch.tensor([ids], dtype=torch.long, device=device), cache=self.cache,
                          input_pos=torch.arange(start, end, device=device), kv_len=end,
                          last_only=True)[:, -1].float()

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, generator, vocab_size: int):
        if params.greedy:
            return int(logits.argmax(-1)), None
        logits = process_logits(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                min_p=params.min_p)
        q = torch.softmax(logits, dim=-1)
        x = _draw(q[0], generator)
        return x, torch.nn.functional.pad(q, (0, vocab_size - q.shape[-1]))

    def __repr__(self) -> str:
        cfg = self.model.config
        return (f"DraftModel({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                f"num_assistant_tokens={self.num_tokens})")


def make_speculator(*, prompt_lookup_num_tokens: Optional[int] = None, assistant_model=None,
                    num_assistant_tokens: int = 5):
    """The proposer `generate`'s arguments ask for (transformers' names), or None for plain decoding.
    assistant_model may also be a `DraftModel`, kept between calls so that its cache is reused (the chat
    command's turns); num_assistant_tokens is then its own."""
    if prompt_lookup_num_tokens is not None and assistant_model is not None:
        raise Qwen2PureError("prompt_lookup_num_tokens and assistant_model are two ways of speculating: give one")
    if prompt_lookup_num_tokens is not None:
        return PromptLookup(prompt_lookup_num_tokens)
    if assistant_model is None:
        _positive_int("num_assistant_tokens", num_assistant_tokens)
        return None
    if isinstance(assistant_model, DraftModel):
        return assistant_model
    return DraftModel(assistant_model, num_assistant_tokens)


# ---- verification -------------------------------------------------------------------------------------------

def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One id from `probs` (V,), with `generator` (on its own device) or the global RNG."""
    if generator is not None:
        return int(torch.multinomial(probs.to(generator.device), 1, generator=generator))
    return int(torch.multinomial(probs, 1))


def accept_or_resample(p: torch.Tensor, q: Optional[torch.Tensor], x: int,
                       generator: Optional[torch.Generator] = None) -> tuple[bool, int]:
    """The speculative sampling rule for one guess `x` drawn from q: (True, x) with probability
    min(1, p(x) / q(x)), else (False, a token drawn from norm(max(0, p - q))). p, q: (V,) probabilities of the
    target and the proposer; q None means a deterministic guess (one-hot at x). The returned token is
    distributed as p whatever q was (Leviathan et al. 2023, Theorem 1)."""
    px = float(p[x])
    qx = 1.0 if q is None else float(q[x])
    device = "cpu" if generator is None else generator.device
    r = float(torch.rand((), generator=generator, device=device))
    if r * qx <= px:  # r <= p(x) / q(x), without dividing by a q(x) that rounds to 0
        return True, x
    if q is None:
        residual = p.clone()
        residual[x] = 0
    else:
        residual = (p - q).clamp(min=0)
    total = float(residual.sum())
    if not total > torch.finfo(torch.float32).tiny:  # p == q up to rounding: a rejection is a rounding artefact
        residual, total = p, float(p.sum())
    return False, _draw(residual / total, generator)


def _target_logits(engine, row, ids: list[int], t: int) -> torch.Tensor:
    """The target's fp32 logits (k + 1, V) for `ids` fed at slots t .. t + k of the row's cache (row 0)."""
    device, n = engine.device, len(ids)
    pos = torch.arange(row.length, row.length + n, device=device)[None]
    mask = None if engine._dense([row]) else engine.mask[:1, :t + n]
    cache = KVCache.wrap(engine.cache.k[:, :1], engine.cache.v[:, :1])
    return engine.model(torch.tensor([ids], dtype=torch.long, device=device), attention_mask=mask, position_ids=pos,
                        cache=cache, input_pos=torch.arange(t, t + n, device=device), kv_len=t + n)[0].float()


def _verify(row, logits: torch.Tensor, guesses: list[int], q: Optional[torch.Tensor]) -> list[int]:
    """The tokens a step emits: the accepted guesses, then one token of the target's. The row's penalties see
    each emitted token before the next position's logits are processed, as in plain decoding."""
    p_ = row.seq.params
    emitted = []
    for i in range(len(guesses) + 1):
        x = logits[i:i + 1]
        if row.penalties is not None:
            x = row.penalties.apply(x, p_.repetition_penalty, p_.presence_penalty, p_.frequency_penalty)
        x = process_logits(x, temperature=p_.temperature, top_k=p_.top_k, top_p=p_.top_p, min_p=p_.min_p)
        if p_.greedy:
            tok = int(x.argmax(-1))
            accepted = i < len(guesses) and tok == guesses[i]
        else:
            probs = torch.softmax(x[0], dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise Qwen2PureError("cannot sample: the next-token distribution is not finite (NaN logits, or every "
                                     "token removed by the penalties and filters)")
            if i < len(guesses):
                accepted, tok = accept_or_resample(probs, None if q is None else q[i].to(probs.device), guesses[i],
                                                   row.generator)
            else:
                accepted, tok = False, _draw(probs, row.generator)
        emitted.append(tok)
        if row.penalties is not None:
            row.penalties.update(torch.tensor([tok], device=row.penalties.counts.device))
        if not accepted:
            return emitted
    return emitted


def _fail(engine, row, message: str) -> list[StepOutput]:
    seq = row.seq
    seq.finish_reason, seq.error = "error", f"generation failed: {message}"
    engine._drop([engine.rows.index(row)])
    return [StepOutput(seq, error=seq.error, finish_reason="error")]


def speculative_step(engine, row, proposer) -> Optional[list[StepOutput]]:
    """One speculative step of the engine's only running row: guess, verify in one target forward, emit.

    Returns one StepOutput per emitted token (the engine's per-token path made each), or None when the
    proposer has no guess (the caller then takes a plain step)."""
    seq = row.seq
    want = min(proposer.num_tokens, seq.max_new_tokens - len(seq.tokens) - 1)
    if engine.t + want >= engine.max_seq_len and row.start > 0:  # make room: the row moves to slot 0
        engine._compact()
    t = engine.t
    k = min(want, engine.max_seq_len - t - 1)
    if k < 1:
        return None
    try:
        guesses, q = proposer.propose(seq.prompt + seq.tokens, k, params=seq.params, generator=row.generator,
                                      stop_ids=row.stop_ids, vocab_size=engine.vocab_size, max_len=engine.max_seq_len)
    except Exception as e:  # a failing draft model ends this sequence, like a failing forward
        return _fail(engine, row, _describe(e, row, "the draft model"))
    if not guesses:
        return None
    k = len(guesses)
    engine.mask[0, t:t + k + 1] = 1
    logits, failed = engine._forward_isolated([0], lambda _: _target_logits(engine, row, [row.next_token] + guesses, t))
    if failed:
        return _fail(engine, row, failed[0])
    try:
        emitted = _verify(row, logits, guesses, q)
    except Exception as e:
        return _fail(engine, row, _describe(e, row, "sampling"))
    fed = len(emitted)  # the last token and the accepted guesses now hold slots t .. t + fed - 1
    engine.mask[0, t + fed:t + k + 1] = 0
    engine.t = t + fed
    row.length += fed
    stats = engine.stats
    stats["steps"] += 1
    stats["max_batch"] = max(stats["max_batch"], 1)
    stats["spec_steps"] = stats.get("spec_steps", 0) + 1
    stats["spec_proposed"] = stats.get("spec_proposed", 0) + k
    stats["spec_accepted"] = stats.get("spec_accepted", 0) + fed - 1
    outputs = []
    for tok in emitted:
        try:
            out = engine._advance(row, tok)
        except Exception as e:  # detokenization, stop strings
            return outputs + _fail(engine, row, _describe(e, row, "detokenization"))
        outputs.append(out)
        if out.finish_reason is not None:  # a stop or the length limit inside the run: the rest is dropped
            # the cache holds the keys/values of every kept token but the last, as after a plain last step
            row.length = len(seq.prompt) + len(seq.tokens) - 1
            engine._keep_prefix(0, row)
            engine._drop([0])
            break
    return outputs
