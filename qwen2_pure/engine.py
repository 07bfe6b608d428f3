"""The generation engine: sequences decoded together over one static KV cache.

Every way of generating goes through this one loop: `generate` / `stream_generate` / `stream_text`, the chat
command and the server, whose scheduler (`qwen2_pure.serve.engine`) adds only a thread, a queue and
disconnects. The engine owns:

- **Rows.** Each running `Sequence` holds one row (batch index) of a KV cache (L, rows, H_kv, T, D). Running
  rows are packed at 0..n-1, so a step runs the model once on the view `cache[:, :n]`; when a sequence ends,
  the last row's keys/values are moved into its place.
- **A shared time axis.** All rows write their new token at the same cache slot `t` in a step. A sequence's
  prompt is prefilled to end at slot t (left padding when several arrive together), its tokens sit at whatever
  slots were current when they were written, and an attention mask (n, T) over cache slots says which slots
  each row may read. RoPE positions are per row (`position_ids`, counting the row's own tokens), so a row's
  logits do not depend on where its tokens sit on the axis. When every row's tokens start at slot 0 (one
  batch of equal prompts, the common case) no mask is passed: the model takes its plain causal path.
- **Compaction.** When the axis is full, or more than half of it is slots no row reads, each row's slots are
  gathered and right-aligned to end at t = the longest row's length. Keys were rotated by RoPE before they
  were cached, so moving them changes nothing.
- **The decode step**: eager (`kv_len` = t + 1, a Python int: no host sync), or compiled / CUDA-graphed
  (`qwen2_pure.fast`) when the model's settings say `compile=True`.
- **Sampling** per row with the sequence's own `SamplingParams` and `torch.Generator`; rows with equal
  parameters are sampled in one batched call (so a batch of one request's prompts draws exactly as before).
- **Stops**: stop token ids (the stop token is kept, as transformers does), stop strings (through
  `TextStream`, UTF-8-safe; the stop string is not returned), `max_new_tokens`.
- **Failure isolation.** A failure caused by one sequence's inputs ends that sequence only: a batched
  forward (prefill or decode) that raises is retried row by row, and only the rows that fail alone get the
  error; sampling, detokenization and stop strings run per row under the same rule. The others continue as
  if nothing happened (their cache rows are rewritten by the retry).

The engine has no threads and knows nothing of HTTP or terminals: `add` prefills new sequences, `step` runs
one decode step, both return a `StepOutput` per sequence touched.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq

import torch

from .cache import KVCache
from .errors import Qwen2PureError
from .prompt_cache import PrefixPool, PromptCache, model_fingerprint
from .sampling import PenaltyState, SamplingParams, process_logits, sample_next

log = logging.getLogger("qwen2_pure.engine")

# compact when the time axis is at least this long and more than half of it is slots no row reads
COMPACT_FROM = 256


@dataclass(eq=False)
class Sequence:
    """One prompt to generate from, and its state while it runs.

    prompt: token ids. params: how to sample (validated on admission). max_new_tokens: the most tokens to
    generate. stop_token_ids: ids that end it (None: the engine's eos ids; [] never). stop: stop strings
    (need an engine with a tokenizer). generator: the torch.Generator to draw from (None: one seeded from
    params.seed when given, else the global RNG).
    """

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 16
    stop_token_ids: Optional[Seq[int]] = None
    stop: Seq[str] = ()
    skip_special_tokens: bool = True
    generator: Optional[torch.Generator] = None
    prompt_cache: Optional[PromptCache] = None  # reused for the prompt's prefix, then updated (qwen2_pure.prompt_cache)
    # each called as f(generated token ids, logits (V,) fp32) -> logits before the penalties and warpers, e.g. a
    # grammar's mask of the tokens that may come next (-inf elsewhere)
    logits_processors: Seq[Callable[[list, torch.Tensor], torch.Tensor]] = ()
    # None: no log-probabilities; k >= 0: each token's log-probability and the k most likely tokens' (from the
    # model's raw distribution, before processors, penalties and warpers: vLLM's default, "raw_logprobs")
    logprobs: Optional[int] = None
    id: str = ""
    # state, written by the engine
    tokens: list[int] = field(default_factory=list)  # generated ids (the stop token included)
    finish_reason: Optional[str] = None  # "stop" | "length" | "error" | "cancelled"
    error: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    """What one call did for one sequence: its new token (None when it failed), the text that became
    printable, and, when it ended, why."""

    seq: Sequence
    token: Optional[int] = None
    text: str = ""
    logprob: Optional[float] = None  # with Sequence.logprobs: log p(token) under the model's raw distribution
    top_logprobs: Optional[list] = None  # [(token id, log p)] of the Sequence.logprobs most likely tokens
    finish_reason: Optional[str] = None
    error: Optional[str] = None


def _describe(e: Exception, row: "_Row", where: str) -> str:
    """The message a sequence's failure reports (and the log's traceback)."""
    log.error("%s failed for %s:\n%s", where, row.seq.id or "a sequence", traceback.format_exc())
    return str(e) if isinstance(e, Qwen2PureError) else f"{type(e).__name__}: {e}"


def _logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list]:
    """log p(token) and the k most likely tokens' log-probabilities under softmax(logits) (V,)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k > 0 else None
    return float(lp[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


class _Row:
    """Engine-side state of a running sequence."""

    def __init__(self, seq: Sequence, engine: "Engine"):
        self.seq = seq
        p = seq.params
        self.penalties = None
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            self.penalties = PenaltyState([seq.prompt], engine.vocab_size, device=engine.device)
        self.generator = seq.generator
        if self.generator is None and not p.greedy and p.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(p.seed)  # as generate(seed=) row 0
        ids = engine.stop_ids if seq.stop_token_ids is None else seq.stop_token_ids
        self.stop_ids = frozenset(int(t) for t in ids)
        self.text = None
        if engine.tokenizer is not None:
            from .tokenizer import TextStream
            self.text = TextStream(engine.tokenizer, skip_special_tokens=seq.skip_special_tokens, stop=list(seq.stop))
        self.length = len(seq.prompt)  # this sequence's tokens in the cache
        self.start = 0  # the slot of its first token
        self.reused = 0  # leading prompt tokens whose keys/values came from a prompt cache
        self.source: Optional[PromptCache] = None  # that cache
        self.next_token = -1  # the sampled token the next decode step feeds

    def sampling_key(self):
        """Rows with equal keys are sampled in one call."""
        p = self.seq.params
        own = id(self.seq) if self.seq.logits_processors else None  # a row's own processors: sampled alone
        return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                p.frequency_penalty, self.generator is None, self.penalties is None, own)


class Engine:
    """Sequences decoded together over one static KV cache (see the module docstring).

    model: a Qwen2ForCausalLM. max_batch: rows of the cache. max_seq_len: slots per row, the most prompt +
    new tokens a sequence may have (default: the model's context). tokenizer: makes each step's text and
    honours stop strings (None: tokens only). stop_ids: the default stop ids (None: the model's
    generation_config eos ids). prefix_pool: where finished sequences leave their keys/values and new ones
    look for a shared prefix (`qwen2_pure.prompt_cache.PrefixPool`; None: only a sequence's own
    `prompt_cache` is reused). speculator: a proposer of `qwen2_pure.speculative` (PromptLookup, DraftModel):
    while exactly one sequence runs, each step verifies its guesses in one forward and may emit several
    tokens (one StepOutput each); with more rows, plain steps.
    """

    def __init__(self, model, *, max_batch: int, max_seq_len: Optional[int] = None, tokenizer=None,
                 stop_ids: Optional[Seq[int]] = None, prefix_pool: Optional[PrefixPool] = None,
                 speculator=None):
        cfg = model.config
        context = cfg.max_position_embeddings
        max_seq_len = context if max_seq_len is None else max_seq_len
        for name, value, low in (("max_batch", max_batch, 1), ("max_seq_len", max_seq_len, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise Qwen2PureError(f"{name}={value!r} is invalid: it must be an integer >= {low}")
        if max_seq_len > context:
            raise Qwen2PureError(f"max_seq_len={max_seq_len} exceeds the model's context "
                                 f"(max_position_embeddings={context})")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.device = model.device
        self.vocab_size = cfg.vocab_size
        gen_cfg = model.generation_config
        self.stop_ids = list(gen_cfg.eos_token_id if stop_ids is None else stop_ids)
        self.pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else 0
        self.cache: KVCache = model.new_cache(max_batch, max_seq_len)
        self.mask = torch.zeros((max_batch, max_seq_len), dtype=torch.long, device=self.device)
        self.rows: list[_Row] = []
        self.t = 0  # the next cache slot on the shared time axis
        self.speculator = speculator
        self.step_fn = None
        if model.settings.compile:
            from .fast import decode_step_for
            self.step_fn = decode_step_for(model)
        self.prefix_pool = prefix_pool
        self.fingerprint = model_fingerprint(model)
        self.stats = {"steps": 0, "tokens": 0, "compactions": 0, "max_batch": 0, "prefill_tokens": 0,
                      "prefix_hits": 0, "prefix_tokens_reused": 0}

    # ---- admission ------------------------------------------------------------------------------------------

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.rows)

    @property
    def running(self) -> list[Sequence]:
        return [r.seq for r in self.rows]

    def check(self, seq: Sequence) -> None:
        """Raise `Qwen2PureError` (naming the field) if `seq` can never run on this engine."""
        if not seq.prompt:
            raise Qwen2PureError("the prompt is empty: give at least one token")
        if not isinstance(seq.max_new_tokens, int) or isinstance(seq.max_new_tokens, bool) or seq.max_new_tokens < 1:
            raise Qwen2PureError(f"max_new_tokens={seq.max_new_tokens!r} must be an integer >= 1")
        bad = [t for t in seq.prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise Qwen2PureError(f"the prompt contains token id {bad[0]!r}, outside the vocabulary [0, {self.vocab_size})")
        if len(seq.prompt) + seq.max_new_tokens > self.max_seq_len:
            raise Qwen2PureError(f"prompt ({len(seq.prompt)} tokens) + max_new_tokens ({seq.max_new_tokens}) exceeds "
                                 f"max_seq_len={self.max_seq_len}")
        if seq.stop and self.tokenizer is None:
            raise Qwen2PureError("stop strings need a tokenizer: Engine(..., tokenizer=tok)")
        seq.params.validate()

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Prefill `seqs` into free rows (one left-padded forward) and sample their first tokens."""
        if not seqs:
            return []
        if len(seqs) > self.free_rows:
            raise Qwen2PureError(f"{len(seqs)} sequences for {self.free_rows} free rows (max_batch={self.max_batch})")
        outputs: list[StepOutput] = []
        rows = []
        for seq in seqs:
            try:
                self.check(seq)
                rows.append(_Row(seq, self))
            except Exception as e:
                outputs.append(self._fail_new(seq, e))
        if not rows:
            return outputs
        for r in rows:
            self._find_prefix(r)
        rows.sort(key=lambda r: r.reused > 0)  # rows computed from scratch first: they share one forward
        longest = max(r.length for r in rows)
        if self.t >= self.max_seq_len:
            self._compact()
        if longest > self.t and self.rows:  # the running rows move right, so that every row stays contiguous
            self._compact(end=longest)
        t = max(self.t, longest)
        lo = len(self.rows)
        for j, r in enumerate(rows):
            r.start = t - r.length
            self.mask[lo + j] = 0
            self.mask[lo + j, r.start:t] = 1
            if r.reused:  # the prefix's keys/values go to the row's first slots; the prefill computes the rest
                src = r.source
                self.cache.k[:, lo + j, :, r.start:r.start + r.reused] = src.k[:, :, :r.reused]
                self.cache.v[:, lo + j, :, r.start:r.start + r.reused] = src.v[:, :, :r.reused]
        self.rows.extend(rows)
        self.t = t
        self.stats["prefill_tokens"] += sum(r.length - r.reused for r in rows)
        # one forward for the rows without a prefix; each row with one alone (the left padding of a shared
        # forward would overwrite its copied slots)
        fresh = [lo + j for j, r in enumerate(rows) if not r.reused]
        groups = ([fresh] if fresh else []) + [[lo + j] for j, r in enumerate(rows) if r.reused]
        indices, parts, failed = [], [], {}
        for group in groups:  # every forward first: finishing a row moves rows, which would shift the indices
            logits, group_failed = self._forward_isolated(group, self._prefill_logits)
            if logits is None:
                logits = torch.full((len(group), self.vocab_size), float("nan"), device=self.device)
            failed.update({len(indices) + j: message for j, message in group_failed.items()})
            indices += group
            parts.append(logits)
        return outputs + self._finish_step(indices, torch.cat(parts), failed)

    def _find_prefix(self, r: _Row) -> None:
        """Where this row's prompt prefix comes from: its own prompt cache, else the pool's best entry."""
        own = r.seq.prompt_cache
        if own is not None and own.usable_for(self.model):
            r.source, r.reused = own, own.reusable(r.seq.prompt)
        elif self.prefix_pool is not None:
            r.source, r.reused = self.prefix_pool.lookup(r.seq.prompt)
        if r.reused:
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens_reused"] += r.reused

    def _prefill_logits(self, indices: list[int]) -> torch.Tensor:
        rows = [self.rows[i] for i in indices]
        t = self.t
        width = max(r.length - r.reused for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):  # left padding: the prompt ends at slot t - 1, RoPE positions 0..n-1
            n = r.length - r.reused  # the tokens computed here: all but the reused prefix
            ids[j, width - n:] = torch.tensor(r.seq.prompt[r.reused:], dtype=torch.long)
            pos[j, width - n:] = torch.arange(r.reused, r.length)
        lo, hi = indices[0], indices[-1] + 1
        assert indices == list(range(lo, hi))
        mask = None if self._dense(rows) else self.mask[lo:hi, :t]
        return self.model(ids.to(self.device), attention_mask=mask, position_ids=pos.to(self.device),
                          cache=KVCache.wrap(self.cache.k[:, lo:hi], self.cache.v[:, lo:hi]),
                          input_pos=torch.arange(t - width, t, device=self.device), kv_len=t,
                          last_only=True)[:, -1].float()

    # ---- decoding -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One decode step for every running sequence: the token sampled last is fed, the next one sampled."""
        if not self.rows:
            return []
        if self.t >= self.max_seq_len or (self.t >= COMPACT_FROM and 2 * max(r.length for r in self.rows) < self.t):
            self._compact()
        if self.speculator is not None and len(self.rows) == 1 and not self.rows[0].seq.logits_processors \
                and self.rows[0].seq.logprobs is None:  # those need every position's own sampling pass
            outputs = self.speculator.step(self)  # qwen2_pure.speculative: guesses verified in one forward
            if outputs is not None:  # None: no guess this time, a plain step
                return outputs
        n, t = len(self.rows), self.t
        self.mask[:n, t] = 1
        self.t = t + 1
        for r in self.rows:
            r.length += 1
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        indices = list(range(n))
        logits, failed = self._forward_isolated(indices, lambda ix: self._decode_logits(ix, t))
        return self._finish_step(indices, logits, failed)

    def _decode_logits(self, indices: list[int], t: int) -> torch.Tensor:
        lo, hi = indices[0], indices[-1] + 1
        rows = self.rows[lo:hi]
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.length - 1] for r in rows], dtype=torch.long, device=self.device)
        input_pos = torch.tensor([t], device=self.device)
        dense = self._dense(rows)
        if self.step_fn is not None and len(indices) == len(self.rows):  # the whole batch; a retry of one row is eager
            # a power-of-two batch (the compiled shapes are static; see qwen2_pure.fast): the padding rows are free
            # rows, whose mask is all zero (or, dense, their own stale slots): their logits are dropped
            B = min(1 << (hi - 1).bit_length(), self.max_batch)
            if B > hi:
                ids = torch.cat([ids, torch.full((B - hi, 1), self.pad_id, dtype=torch.long, device=self.device)])
                pos = torch.cat([pos, torch.zeros((B - hi, 1), dtype=torch.long, device=self.device)])
            return self.step_fn(ids, pos, input_pos, None if dense else self.mask[:B], self.cache)[:hi]
        cache = KVCache.wrap(self.cache.k[:, lo:hi], self.cache.v[:, lo:hi])
        return self.model(ids, attention_mask=None if dense else self.mask[lo:hi, :t + 1], position_ids=pos,
                          cache=cache, input_pos=input_pos, kv_len=t + 1, last_only=True)[:, -1].float()

    def _dense(self, rows: list[_Row]) -> bool:
        """Every row's tokens fill slots [0, t): the plain causal mask says it all."""
        return all(r.start == 0 for r in rows)

    def _forward_isolated(self, indices: list[int], forward: Callable[[list[int]], torch.Tensor]):
        """logits (len(indices), V) of one batched forward; if it raises, each row alone. Returns the logits
        (rows that failed alone hold garbage) and {position in indices: error message}."""
        try:
            return forward(indices), {}
        except Exception as e:
            if len(indices) == 1:
                return None, {0: _describe(e, self.rows[indices[0]], "the forward pass")}
            log.warning("a batched forward failed (%s: %s); retrying row by row", type(e).__name__, e)
        parts, failed = [], {}
        for j, i in enumerate(indices):
            try:
                parts.append(forward([i]))
            except Exception as e:
                failed[j] = _describe(e, self.rows[i], "the forward pass")
                parts.append(torch.full((1, self.vocab_size), float("nan"), device=self.device))
        return torch.cat(parts), failed

    # ---- sampling and stops ---------------------------------------------------------------------------------

    def _finish_step(self, indices: list[int], logits: Optional[torch.Tensor], failed: dict) -> list[StepOutput]:
        rows = [self.rows[i] for i in indices]
        tokens, errors = self._sample(rows, logits, failed)
        outputs, ended = [], []
        for j, (i, r, tok, err) in enumerate(zip(indices, rows, tokens, errors)):
            seq = r.seq
            if err is None:
                try:
                    out = self._advance(r, tok)
                    if seq.logprobs is not None:
                        out.logprob, out.top_logprobs = _logprobs(logits[j], tok, seq.logprobs)
                except Exception as e:  # detokenization, stop strings
                    err = _describe(e, r, "detokenization")
            if err is not None:
                seq.finish_reason, seq.error = "error", f"generation failed: {err}"
                out = StepOutput(seq, error=seq.error, finish_reason="error")
            if out.finish_reason is not None:
                ended.append(i)
                if out.error is None:
                    self._keep_prefix(i, r)
            outputs.append(out)
        self._drop(ended)
        return outputs

    def _keep_prefix(self, i: int, r: _Row) -> None:
        """A finished sequence's keys/values (prompt + answer but the last token, which was never fed) go to
        its prompt cache, and to the pool."""
        if r.seq.prompt_cache is None and self.prefix_pool is None:
            return
        tokens = r.seq.prompt + r.seq.tokens[:r.length - len(r.seq.prompt)]
        window = slice(r.start, r.start + r.length)
        k, v = self.cache.k[:, i, :, window].clone(), self.cache.v[:, i, :, window].clone()  # (L, H_kv, n, D)
        if r.seq.prompt_cache is not None:
            r.seq.prompt_cache.update(tokens, k, v, self.fingerprint)
        if self.prefix_pool is not None:
            self.prefix_pool.add(PromptCache(tokens, k, v, self.fingerprint))

    def _sample(self, rows: list[_Row], logits: Optional[torch.Tensor], failed: dict):
        """One token per row; rows with equal sampling parameters share one call; a failing group is retried
        row by row. Returns (tokens, error messages or None) per row."""
        tokens: list[Optional[int]] = [None] * len(rows)
        errors: list[Optional[str]] = [failed.get(j) for j in range(len(rows))]
        groups: dict = {}
        for j, r in enumerate(rows):
            if errors[j] is None:
                groups.setdefault(r.sampling_key(), []).append(j)
        for members in groups.values():
            # a retry row by row must draw what the shared call would have drawn: keep the generators' states
            states = [(rows[j].generator, rows[j].generator.get_state()) for j in members
                      if rows[j].generator is not None]
            try:
                for j, tok in zip(members, self._sample_rows([rows[j] for j in members], logits[members])):
                    tokens[j] = tok
            except Exception as e:
                if len(members) == 1:
                    errors[members[0]] = _describe(e, rows[members[0]], "sampling")
                    continue
                for g, state in states:
                    g.set_state(state)
                for j in members:
                    try:
                        tokens[j] = self._sample_rows([rows[j]], logits[j:j + 1])[0]
                    except Exception as e:
                        errors[j] = _describe(e, rows[j], "sampling")
        return tokens, errors

    @staticmethod
    def _sample_rows(rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Sample rows that share their parameters, as `generate` has always sampled a batch."""
        p = rows[0].seq.params
        for f in rows[0].seq.logits_processors:  # such a row is sampled alone (see sampling_key)
            logits = f(list(rows[0].seq.tokens), logits[0].float())[None]
        if rows[0].penalties is not None:
            logits = torch.cat([r.penalties.apply(logits[j:j + 1], p.repetition_penalty, p.presence_penalty,
                                                  p.frequency_penalty) for j, r in enumerate(rows)])
        logits = process_logits(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        generators = None if rows[0].generator is None else [r.generator for r in rows]
        toks = sample_next(logits, temperature=p.temperature, generators=generators)
        if rows[0].penalties is not None:
            for j, r in enumerate(rows):
                r.penalties.update(toks[j:j + 1])
        return toks.tolist()

    def _advance(self, r: _Row, tok: int) -> StepOutput:
        seq = r.seq
        seq.tokens.append(tok)
        r.next_token = tok
        self.stats["tokens"] += 1
        text = r.text.push(tok) if r.text is not None else ""
        reason = None
        if (r.text is not None and r.text.stopped) or tok in r.stop_ids:
            reason = "stop"
        elif len(seq.tokens) >= seq.max_new_tokens:
            reason = "length"
        if reason is not None:
            if r.text is not None:
                text += r.text.finish()
            seq.finish_reason = reason
        return StepOutput(seq, token=tok, text=text, finish_reason=reason)

    def _fail_new(self, seq: Sequence, e: Exception) -> StepOutput:
        message = str(e) if isinstance(e, Qwen2PureError) else f"{type(e).__name__}: {e}"
        seq.finish_reason, seq.error = "error", message
        return StepOutput(seq, error=message, finish_reason="error")

    # ---- cache bookkeeping ----------------------------------------------------------------------------------

    def remove(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop a running sequence now and free its row."""
        for i, r in enumerate(self.rows):
            if r.seq is seq:
                if seq.finish_reason is None:
                    seq.finish_reason = reason
                self._drop([i])
                return

    def _drop(self, indices: list[int]) -> None:
        """Free rows: move the last running row into each freed one, so running rows stay packed at 0..n-1."""
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                t = self.t
                self.cache.k[:, i, :, :t] = self.cache.k[:, last, :, :t]
                self.cache.v[:, i, :, :t] = self.cache.v[:, last, :, :t]
                self.mask[i, :t] = self.mask[last, :t]
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self.mask[last] = 0
        if not self.rows:
            self.t = 0

    def _compact(self, end: Optional[int] = None) -> None:
        """Right-align every row's slots to end at `end` (default: the longest row's length, which drops every
        slot nobody reads). A row's slots are always contiguous, [start, start + length), so this is a move."""
        target = max((r.length for r in self.rows), default=0) if end is None else end
        for i, r in enumerate(self.rows):
            start = target - r.length
            if start == r.start:
                continue
            old = slice(r.start, r.start + r.length)
            # (L, H_kv, len, D) each; cloned because the old and new ranges may overlap
            self.cache.k[:, i, :, start:target] = self.cache.k[:, i, :, old].clone()
            self.cache.v[:, i, :, start:target] = self.cache.v[:, i, :, old].clone()
            self.mask[i] = 0
            self.mask[i, start:target] = 1
            r.start = start
        self.t = target
        self.stats["compactions"] += 1
