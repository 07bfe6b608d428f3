"""The server's scheduler: one thread drives the generation engine over every running request.

The batching itself — rows of one static KV cache, a shared time axis with per-row positions and masks,
compaction, per-row sampling and stops, failure isolation, the compiled decode step — is the generation
engine's (`qwen2_pure.engine`), the same one `generate` and the chat command drive. This module adds only
what a server needs on top:

- **Admission.** Requests wait in a bounded queue (`max_queue`; beyond it `submit` raises `QueueFull`, the
  server's 429) and are admitted between decode steps into free rows, up to `prefill_budget` prompt tokens
  per step, so a burst of long prompts delays the running streams by a bounded amount.
- **A thread.** The loop runs in a daemon thread; requests come in through `submit` from any thread, results go
  out through each request's `on_event` callback, called from the engine thread (the web app forwards it to
  an asyncio queue).
- **Prompt cache.** Finished requests leave their keys/values in a bounded pool (`prompt_cache_mb`); a new
  request whose prompt shares a prefix of at least 16 tokens with one of them copies those instead of
  recomputing them (`qwen2_pure.prompt_cache`). `stats["prefix_hits"]` counts the hits.
- **Disconnects.** `cancel` removes a request from the queue, or frees its row before the next step.
- **Faults.** A failure caused by one request's inputs ends that request only, with its own error event (the
  engine isolates rows); only a bug in the loop itself stops the thread, and then every client is told.

Greedy results equal sequential `qwen2_pure.generate` (tests/test_serve.py checks it).
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
from typing import Callable, Optional
from typing import Sequence as Sequence_

import torch

from ..engine import Engine as GenerationEngine
from ..engine import Sequence
from ..errors import Qwen2PureError
from ..prompt_cache import PrefixPool
from ..sampling import SamplingParams

log = logging.getLogger("qwen2_pure.serve")

DEFAULT_SLOTS = 16
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_QUEUE = 64
DEFAULT_PREFILL_BUDGET = 2048
DEFAULT_PROMPT_CACHE_MB = 512  # keys/values of recently finished requests kept for prefix reuse


class QueueFull(Qwen2PureError):
    """The engine's waiting queue is full (the server answers 429)."""


class EngineStopped(Qwen2PureError):
    """The engine is not running (the server answers 503)."""


@dataclass
class TokenLogprob:
    """One generated token's log-probability (with `Request.logprobs`), from the model's raw distribution
    (`qwen2_pure.engine`): the token, log p(token), the k most likely [(id, log p)], and `offset`, the
    number of characters of the answer's text released before this token (its place in the text)."""

    token: int
    logprob: float
    top: list
    offset: int


@dataclass
class Event:
    """What the engine reports for a request: new text, and at the end a finish reason or an error."""

    text: str = ""
    completion_tokens: int = 0  # tokens generated so far (the stop token included)
    finish_reason: Optional[str] = None  # "stop" | "length" when the request is done
    error: Optional[str] = None  # set (and the request done) when generation failed
    logprobs: Optional[list] = None  # with Request.logprobs: a TokenLogprob per token this event covers

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Request:
    """One generation: prompt token ids in, events out through `on_event` (called from the engine thread)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence_[str] = ()
    stop_token_ids: Optional[Sequence_[int]] = None  # None: the model's eos ids
    on_event: Optional[Callable[[Event], None]] = None
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None  # None: none; k >= 0: each token's log-probability and the top k (TokenLogprob)
    generator: Optional[torch.Generator] = None  # what sampling draws from (None: from params.seed, else random)
    # the sequence's own logits processors (`qwen2_pure.engine.Sequence`), e.g. a grammar's (serve/constrained.py)
    logits_processors: Sequence_[Callable] = ()
    id: str = ""
    cancelled: bool = False  # set by `Engine.cancel`; the engine drops the request at its next step
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    text_chars: int = 0  # characters of text delivered so far (TokenLogprob.offset)
    seq: Optional[Sequence] = field(default=None, repr=False)  # the engine's sequence, once submitted


class Engine:
    """Continuous batching for one model. `start()` runs the decode loop in a daemon thread.

    slots: rows of the KV cache, i.e. requests decoded together; max_seq_len (T): cache slots per row, the
    longest prompt + answer a request may have (default: the model's context, capped at 4096); max_queue:
    requests that may wait for a row before `submit` raises `QueueFull`; prefill_budget: prompt tokens admitted
    per step; prompt_cache_mb: the keys/values of recently finished requests kept so that a request sharing a
    prefix with one of them (a system prompt, a chat's history) does not recompute it (0 turns it off);
    speculator: a `qwen2_pure.speculative` proposer (PromptLookup, DraftModel), used while one request runs.
    """

    def __init__(self, model, tokenizer, *, slots: int = DEFAULT_SLOTS, max_seq_len: Optional[int] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, prefill_budget: int = DEFAULT_PREFILL_BUDGET,
                 prompt_cache_mb: int = DEFAULT_PROMPT_CACHE_MB, speculator=None):
        if max_seq_len is None:
            max_seq_len = min(model.config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        for name, value, low in (("slots", slots, 1), ("max_queue", max_queue, 0), ("prefill_budget", prefill_budget, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise Qwen2PureError(f"{name}={value!r} is invalid: it must be an integer >= {low}")
        if not isinstance(prompt_cache_mb, int) or isinstance(prompt_cache_mb, bool) or prompt_cache_mb < 0:
            raise Qwen2PureError(f"prompt_cache_mb={prompt_cache_mb!r} is invalid: it must be an integer >= 0")
        pool = PrefixPool(prompt_cache_mb << 20) if prompt_cache_mb else None
        self.core = GenerationEngine(model, max_batch=slots, max_seq_len=max_seq_len, tokenizer=tokenizer,
                                     prefix_pool=pool, speculator=speculator)
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.max_seq_len, self.max_queue, self.prefill_budget = slots, max_seq_len, max_queue, \
            prefill_budget
        self._pending: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # id(sequence) -> its request
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._ids = itertools.count()
        self.requests = 0
        self.dead: Optional[str] = None  # set if the loop itself died (a bug): the server reports 503

    # what the tests and /health look at
    @property
    def stats(self) -> dict:
        return {**self.core.stats, "requests": self.requests}

    @property
    def t(self) -> int:
        return self.core.t

    @property
    def mask(self) -> torch.Tensor:
        return self.core.mask

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
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting for a row, and
        `Qwen2PureError` (naming the field) for a request that can never run."""
        p = req.params
        # each sampling request draws from its own generator (the global RNG is shared by every thread)
        generator = req.generator
        if generator is None and not p.greedy:
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device="cpu").manual_seed(seed)
        req.seq = Sequence(prompt=list(req.prompt), params=p, max_new_tokens=req.max_tokens,
                           stop_token_ids=req.stop_token_ids, stop=list(req.stop),
                           skip_special_tokens=req.skip_special_tokens, generator=generator, logprobs=req.logprobs,
                           logits_processors=list(req.logits_processors))
        try:
            self.core.check(req.seq)
        except Qwen2PureError as e:  # the engine's words are max_new_tokens; the API's are max_tokens
            raise Qwen2PureError(str(e).replace("max_new_tokens", "max_tokens")) from None
        with self._cond:
            if not self.running:
                raise EngineStopped("the engine is not running" + (f" ({self.dead})" if self.dead else ""))
            if len(self._pending) >= self.max_queue + max(0, self.slots - len(self._running)):
                raise QueueFull(f"the server is busy: {len(self._pending)} requests are waiting for one of "
                                f"{self.slots} slots (max_queue={self.max_queue}); retry later")
            if not req.id:
                req.id = f"req-{next(self._ids)}"
            req.seq.id = req.id
            self._pending.append(req)
            self.requests += 1
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
            return {"running": len(self._running), "waiting": len(self._pending), "slots": self.slots,
                    "max_seq_len": self.max_seq_len, **self.stats}

    def generate(self, prompt: Sequence_[int], max_tokens: int, timeout: Optional[float] = None,
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
                        while not self._running and not self._pending and not self._stopping:
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
                running = list(self._running.values())
                self._running.clear()
            for req in running:
                self._emit(req, Event(error="the server is shutting down", completion_tokens=len(req.seq.tokens)))
            for req in waiting:
                self._emit(req, Event(error="the server is shutting down"))

    def _take_pending(self) -> list[Request]:
        """Waiting requests that get a row now: as many as there are free rows, within the prefill budget."""
        taken, tokens = [], 0
        while self._pending and len(self._running) + len(taken) < self.slots:
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
        for req in [r for r in self._running.values() if r.cancelled]:
            self.core.remove(req.seq)
            self._forget(req)
        with self._cond:
            self._running.update({id(req.seq): req for req in admitted})
        if admitted:
            self._deliver(self.core.add([req.seq for req in admitted]))
        if self.core.rows:
            self._deliver(self.core.step())

    def _deliver(self, outputs) -> None:
        for out in outputs:
            req = self._running.get(id(out.seq))
            if req is None:
                continue
            n = len(out.seq.tokens)
            req.completion_tokens = n
            if out.error is not None:
                self._emit(req, Event(error=out.error, completion_tokens=n))
                self._forget(req)
                continue
            req.finish_reason = out.finish_reason
            logprobs = None
            if req.logprobs is not None and out.token is not None:
                logprobs = [TokenLogprob(out.token, out.logprob, out.top_logprobs or [], req.text_chars)]
            req.text_chars += len(out.text)
            if out.text or out.finish_reason is not None or logprobs:
                self._emit(req, Event(text=out.text, completion_tokens=n, finish_reason=out.finish_reason,
                                      logprobs=logprobs))
            if out.finish_reason is not None:
                self._forget(req)

    def _forget(self, req: Request) -> None:
        with self._cond:
            self._running.pop(id(req.seq), None)

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
