"""The serving engine: one thread owns the model and decodes every running request in the same steps.

Continuous batching over one static KV cache of shape (L, slots, H_kv, T, D):

- **Rows.** Each running request holds one row (batch index) of the cache. Running rows are kept packed at
  rows 0..n-1, so a decode step runs the model once on the view `cache[:, :n]` (B = n) and costs nothing for
  idle rows. When a request ends, the last row's keys/values are copied into its place (a few MB at most).
- **A shared time axis.** All rows write their new token at the same cache slot `t` in a step, as in
  `generate`'s left-padded batches; a request's own tokens sit at whatever slots were current when they were
  written, and an attention mask (n, t + 1) over cache slots says which slots each row may read. RoPE positions
  are per row (`position_ids`), counting only the row's own tokens, so a request's logits do not depend on where
  its tokens sit on the axis: the mask hides everything else, and the model needs no change for this.
- **Admission.** A new request is prefilled into a free row with its prompt ending at slot t (slots
  [t - P, t)), several new requests in one left-padded call; its first token is sampled from the prefill and it
  joins the next decode step. A prompt longer than t moves t forward (the running rows just get masked slots).
  New requests are admitted between decode steps, up to `prefill_budget` prompt tokens per step, so a burst of
  long prompts delays the running streams by a bounded amount.
- **When the axis is full** (t reaches T) — or when more than half of it is slots no running row reads — the
  axis is compacted: each row's slots are gathered and right-aligned to end at t = the longest row's length.
  Keys were rotated by RoPE before they were cached, so moving them between slots changes nothing. Every row
  holds at most T - 1 tokens (a request is admitted only if prompt + max_tokens <= T), so compaction always
  frees a slot and the engine never has to wait for the batch to drain. An empty batch resets t to 0.
- **Sampling** is per row with the request's own parameters and `torch.Generator`, using the functions of
  `qwen2_pure.sampling` exactly as `generate` does; greedy rows without penalties share one argmax. Greedy
  results equal sequential `qwen2_pure.generate` (tests/test_serve.py checks it).
- **Text** is made in the engine thread with `TextStream` (UTF-8-safe, stop strings), so that a stop string
  ends the generation and frees the row at once.

The engine knows nothing of HTTP: requests come in through `submit`, results go out through each request's
`on_event` callback, called from the engine thread (the web app forwards it to an asyncio queue).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..cache import KVCache
from ..errors import Qwen2PureError
from ..generation import _pad_id, default_stop_ids
from ..sampling import PenaltyState, SamplingParams, process_logits, sample_next
from ..tokenizer import TextStream

log = logging.getLogger("qwen2_pure.serve")

DEFAULT_SLOTS = 16
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_QUEUE = 64
DEFAULT_PREFILL_BUDGET = 2048


class QueueFull(Qwen2PureError):
    """The engine's waiting queue is full (the server answers 429)."""


class EngineStopped(Qwen2PureError):
    """The engine is not running (the server answers 503)."""


@dataclass
class Event:
    """What the engine reports for a request: new text, and at the end a finish reason or an error."""

    text: str = ""
    completion_tokens: int = 0  # tokens generated so far (the stop token included)
    finish_reason: Optional[str] = None  # "stop" | "length" when the request is done
    error: Optional[str] = None  # set (and the request done) when generation failed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Request:
    """One generation: prompt token ids in, events out through `on_event` (called from the engine thread)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_token_ids: Optional[Sequence[int]] = None  # None: the model's eos ids
    on_event: Optional[Callable[[Event], None]] = None
    skip_special_tokens: bool = True
    id: str = ""
    cancelled: bool = False  # set by `Engine.cancel`; the engine drops the request at its next step
    completion_tokens: int = 0
    finish_reason: Optional[str] = None


class _Row:
    """Engine-side state of a running request (one cache row)."""

    def __init__(self, req: Request, engine: "Engine"):
        self.req = req
        p = req.params
        self.penalties = None
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            self.penalties = PenaltyState([req.prompt], engine.vocab_size, device=engine.device)
        self.generator = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            # the same seeding as `generate(..., seed=seed)` for its first row
            self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.stop_ids = set(engine.stop_ids if req.stop_token_ids is None else (int(t) for t in req.stop_token_ids))
        self.text = TextStream(engine.tokenizer, skip_special_tokens=req.skip_special_tokens, stop=list(req.stop))
        self.length = len(req.prompt)  # tokens of this request in the cache
        self.next_token = -1  # the sampled token the next decode step feeds
        self.generated = 0

    @property
    def plain_greedy(self) -> bool:
        return self.generator is None and self.penalties is None


class _RowsCache(KVCache):
    """A KVCache over rows [lo, hi) of a bigger one: views, so the model's writes land in the big buffers."""

    def __init__(self, base: KVCache, lo: int, hi: int):  # no super().__init__: nothing is allocated
        self.k = base.k[:, lo:hi]
        self.v = base.v[:, lo:hi]
        self.max_len = base.max_len


class Engine:
    """Continuous batching for one model. `start()` runs the decode loop in a daemon thread.

    slots: rows of the KV cache, i.e. requests decoded together; max_seq_len (T): cache slots per row, the
    longest prompt + answer a request may have (default: the model's context, capped at 4096); max_queue:
    requests that may wait for a row before `submit` raises `QueueFull`.
    """

    def __init__(self, model, tokenizer, *, slots: int = DEFAULT_SLOTS, max_seq_len: Optional[int] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, prefill_budget: int = DEFAULT_PREFILL_BUDGET):
        cfg = model.config
        context = cfg.max_position_embeddings
        if max_seq_len is None:
            max_seq_len = min(context, DEFAULT_MAX_SEQ_LEN)
        for name, value, low in (("slots", slots, 1), ("max_seq_len", max_seq_len, 2), ("max_queue", max_queue, 0),
                                 ("prefill_budget", prefill_budget, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise Qwen2PureError(f"{name}={value!r} is invalid: it must be an integer >= {low}")
        if max_seq_len > context:
            raise Qwen2PureError(f"max_seq_len={max_seq_len} exceeds the model's context "
                                 f"(max_position_embeddings={context})")
        windows = {cfg.layer_window(i) for i in range(cfg.num_hidden_layers)} - {None}
        if windows and min(windows) < max_seq_len:
            # The mask's window counts cache slots; with the engine's masked gaps those are not tokens.
            raise Qwen2PureError(f"the model uses sliding-window attention (window {min(windows)}), which the "
                                 f"server does not support below max_seq_len={max_seq_len}; pass "
                                 f"max_seq_len <= {min(windows)}")
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.max_seq_len, self.max_queue, self.prefill_budget = slots, max_seq_len, max_queue, \
            prefill_budget
        self.device = model.device
        self.vocab_size = cfg.vocab_size
        self.stop_ids = tokenizer.stop_token_ids or default_stop_ids(model)
        self.pad_id = _pad_id(model)
        self.cache = model.new_cache(slots, max_seq_len)
        self.mask = torch.zeros((slots, max_seq_len), dtype=torch.long, device=self.device)
        self.rows: list[_Row] = []  # running requests; rows[i] owns cache row i
        self.t = 0  # the next cache slot on the shared time axis
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._ids = itertools.count()
        self.stats = {"steps": 0, "tokens": 0, "requests": 0, "compactions": 0, "max_batch": 0}
        self.dead: Optional[str] = None  # set if the loop itself died (a bug): the server reports 503

    # ---- public API (any thread) ------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qwen2-pure-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still waiting or running get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, req: Request) -> Request:
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting for a row."""
        if not req.prompt:
            raise Qwen2PureError("the prompt is empty")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise Qwen2PureError(f"max_tokens={req.max_tokens!r} must be an integer >= 1")
        if min(req.prompt) < 0 or max(req.prompt) >= self.vocab_size:  # would fail the whole batch's step
            bad = next(t for t in req.prompt if not 0 <= t < self.vocab_size)
            raise Qwen2PureError(f"the prompt contains token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        if len(req.prompt) + req.max_tokens > self.max_seq_len:
            raise Qwen2PureError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds "
                                 f"max_seq_len={self.max_seq_len}")
        with self._cond:
            if not self.running:
                raise EngineStopped("the engine is not running" + (f" ({self.dead})" if self.dead else ""))
            if len(self._pending) >= self.max_queue + max(0, self.slots - len(self.rows)):
                raise QueueFull(f"the server is busy: {len(self._pending)} requests are waiting for one of "
                                f"{self.slots} slots (max_queue={self.max_queue}); retry later")
            if not req.id:
                req.id = f"req-{next(self._ids)}"
            self._pending.append(req)
            self.stats["requests"] += 1
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away): it leaves the queue or frees its row before the next step."""
        with self._cond:
            req.cancelled = True
            try:
                self._pending.remove(req)
            except ValueError:
                pass
            self._cond.notify_all()

    def load(self) -> dict:
        """Running and waiting requests, and counters, for /health."""
        with self._cond:
            return {"running": len(self.rows), "waiting": len(self._pending), "slots": self.slots,
                    "max_seq_len": self.max_seq_len, **self.stats}

    def generate(self, prompt: Sequence[int], max_tokens: int, timeout: Optional[float] = None,
                 **kwargs) -> tuple[str, Event]:
        """Blocking helper: submit a request and wait for its text (for tests and scripts)."""
        done = threading.Event()
        pieces: list[str] = []
        last: list[Event] = []

        def on_event(ev: Event) -> None:
            pieces.append(ev.text)
            if ev.done:
                last.append(ev)
                done.set()

        req = self.submit(Request(prompt=list(prompt), max_tokens=max_tokens, on_event=on_event, **kwargs))
        if not done.wait(timeout):
            self.cancel(req)
            raise TimeoutError(f"request {req.id} did not finish in {timeout} s")
        return "".join(pieces), last[0]

    # ---- the loop (engine thread) -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self.rows and not self._pending and not self._stopping:
                            self._cond.wait()
                        if self._stopping:
                            break
                        admitted = self._take_pending()
                    self._step(admitted)
        except BaseException as e:  # a bug in the loop itself: report it instead of hanging every client
            self.dead = f"{type(e).__name__}: {e}"
            log.error("engine loop died:\n%s", traceback.format_exc())
        finally:
            with self._cond:
                self._stopping = True
                waiting = list(self._pending)
                self._pending.clear()
            for r in self.rows:
                self._emit(r.req, Event(error="the server is shutting down", completion_tokens=r.generated))
            for req in waiting:
                self._emit(req, Event(error="the server is shutting down"))
            self.rows = []

    def _take_pending(self) -> list[Request]:
        """Waiting requests that get a row now: as many as there are free rows, within the prefill budget."""
        taken, tokens = [], 0
        while self._pending and len(self.rows) + len(taken) < self.slots:
            req = self._pending[0]
            if taken and tokens + len(req.prompt) > self.prefill_budget:
                break
            self._pending.popleft()
            if not req.cancelled:
                taken.append(req)
                tokens += len(req.prompt)
        return taken

    def _step(self, admitted: list[Request]) -> None:
        """Drop cancelled rows, prefill the admitted requests, then one decode step for every running row."""
        self._drop([i for i, r in enumerate(self.rows) if r.req.cancelled])
        new: list[_Row] = []
        try:
            new = [_Row(req, self) for req in admitted]
            if new:
                self._prefill(new)
            if self.rows:
                self._decode()
        except Exception as e:  # e.g. out of memory: fail the requests involved, keep serving the others
            log.error("generation step failed:\n%s", traceback.format_exc())
            message = f"generation failed: {type(e).__name__}: {e}"
            involved = self.rows + [r for r in new if r not in self.rows]
            for r in involved:
                self._emit(r.req, Event(error=message, completion_tokens=r.generated))
            self.rows, self.t = [], 0
            self.mask.zero_()

    def _prefill(self, new: list[_Row]) -> None:
        lens = [len(r.req.prompt) for r in new]
        longest = max(lens)
        if max(self.t, longest) >= self.max_seq_len:  # no slot left for the next decode step
            self._compact()
        t = max(self.t, longest)
        lo, k = len(self.rows), len(new)
        ids = torch.full((k, longest), self.pad_id, dtype=torch.long)
        pos = torch.zeros((k, longest), dtype=torch.long)
        self.mask[lo:lo + k] = 0
        for j, (r, n) in enumerate(zip(new, lens)):
            # left padding: the prompt ends at slot t - 1, RoPE positions 0..n-1
            ids[j, longest - n:] = torch.tensor(r.req.prompt, dtype=torch.long)
            pos[j, longest - n:] = torch.arange(n)
            self.mask[lo + j, t - n:t] = 1
        logits = self.model(ids.to(self.device), attention_mask=self.mask[lo:lo + k, :t],
                            position_ids=pos.to(self.device), cache=_RowsCache(self.cache, lo, lo + k),
                            input_pos=torch.arange(t - longest, t, device=self.device), last_only=True)
        self.t = t
        self.rows.extend(new)
        self._sample_and_emit(list(range(lo, lo + k)), logits[:, -1].float())

    def _decode(self) -> None:
        if self.t >= self.max_seq_len or (self.t >= 256 and 2 * max(r.length for r in self.rows) < self.t):
            self._compact()
        n, t = len(self.rows), self.t
        ids = torch.tensor([[r.next_token] for r in self.rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.length] for r in self.rows], dtype=torch.long, device=self.device)
        self.mask[:n, t] = 1
        logits = self.model(ids, attention_mask=self.mask[:n, :t + 1], position_ids=pos,
                            cache=_RowsCache(self.cache, 0, n), input_pos=torch.tensor([t], device=self.device),
                            last_only=True)
        self.t = t + 1
        for r in self.rows:
            r.length += 1
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        self._sample_and_emit(list(range(n)), logits[:, -1].float())

    def _sample_and_emit(self, indices: list[int], logits: torch.Tensor) -> None:
        """Sample one token for each of rows[indices] from logits (len(indices), V); emit; free finished rows."""
        rows = [self.rows[i] for i in indices]
        tokens: list[int] = [0] * len(rows)
        plain = [j for j, r in enumerate(rows) if r.plain_greedy]
        if plain:
            for j, tok in zip(plain, torch.argmax(logits[plain], dim=-1).tolist()):
                tokens[j] = tok
        for j, r in enumerate(rows):
            if r.plain_greedy:
                continue
            p, row_logits = r.req.params, logits[j:j + 1]
            if r.penalties is not None:
                row_logits = r.penalties.apply(row_logits, p.repetition_penalty, p.presence_penalty,
                                               p.frequency_penalty)
            row_logits = process_logits(row_logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                        min_p=p.min_p)
            tok = sample_next(row_logits, temperature=p.temperature,
                              generators=None if r.generator is None else [r.generator])
            if r.penalties is not None:
                r.penalties.update(tok)
            tokens[j] = int(tok[0])
        finished = []
        for i, r, tok in zip(indices, rows, tokens):
            r.generated += 1
            r.next_token = tok
            self.stats["tokens"] += 1
            text = r.text.push(tok)
            reason = None
            if r.text.stopped or tok in r.stop_ids:
                reason = "stop"
            elif r.generated >= r.req.max_tokens:
                reason = "length"
            if reason is not None:
                text += r.text.finish()
                finished.append(i)
            r.req.completion_tokens = r.generated
            r.req.finish_reason = reason
            if text or reason is not None:
                self._emit(r.req, Event(text=text, completion_tokens=r.generated, finish_reason=reason))
        self._drop(finished)

    # ---- cache bookkeeping ------------------------------------------------------------------------------

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

    def _compact(self) -> None:
        """Right-align every row's slots to end at t = the longest row; drops the slots nobody reads."""
        t = self.t
        target = max((r.length for r in self.rows), default=0)
        for i, r in enumerate(self.rows):
            idx = self.mask[i, :t].nonzero().squeeze(1)  # this row's slots, in order
            assert idx.numel() == r.length, (idx.numel(), r.length)
            start = target - r.length
            self.cache.k[:, i, :, start:target] = self.cache.k[:, i].index_select(2, idx)  # (L, H_kv, len, D)
            self.cache.v[:, i, :, start:target] = self.cache.v[:, i].index_select(2, idx)
            self.mask[i] = 0
            self.mask[i, start:target] = 1
        self.t = target
        self.stats["compactions"] += 1

    def _emit(self, req: Request, ev: Event) -> None:
        if req.on_event is None or req.cancelled:
            return
        try:
            req.on_event(ev)
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            log.debug("dropping an event for request %s:\n%s", req.id, traceback.format_exc())


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once the engine has no running or waiting request (for tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = engine.load()
        if load["running"] == 0 and load["waiting"] == 0:
            return True
        time.sleep(0.01)
    return False
