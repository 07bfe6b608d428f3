"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) and the web chat page.

    GET  /                      the web chat (static files in serve/static, no build step)
    GET  /health                {"status": "ok", running/waiting requests, counters}; 503 if the engine died
    GET  /v1/models             the one served model
    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        plain completion, streamed or not; `suffix`: fill-in-the-middle (Qwen2.5-Coder)
    POST /tokenize              text or a chat -> token ids (vLLM's shape)
    POST /detokenize            token ids -> text
    GET  /metrics               Prometheus metrics (`metrics.py`)

Requests are validated by `protocol`, then handed to the `Engine`, whose thread batches every running request
into the same decode steps; a request for n choices is n engine requests, answered together. Each request's
events cross from the engine thread to the event loop through an asyncio queue. A client that disconnects
cancels its request (all its choices), which frees its cache rows before the next step.
Every error is answered as OpenAI does ({"error": {...}} with the right status) and never stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import Qwen2PureError
from ..sampling import make_generators
from . import constrained, protocol
from .engine import DEFAULT_MAX_QUEUE, DEFAULT_PROMPT_CACHE_MB, DEFAULT_SLOTS, Engine, EngineStopped, Event, QueueFull
from .engine import Request as EngineRequest
from .metrics import CountResponses, Metrics
from .protocol import APIError, Generation, ServerInfo
from .tools import ToolCallStream, rewrite_choice

log = logging.getLogger("qwen2_pure.serve")
STATIC = Path(__file__).with_name("static")
_DISCONNECTED = "client disconnected"
DEFAULT_MODEL_NAME = "qwen2"  # the id /v1/models lists when the caller names none (the CLI passes the checkpoint's)


class _Events:
    """The engine thread's events for a request's choices (one engine request each), as an async iterator on
    the event loop: `next()` returns (choice index, event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._ready: list[tuple[int, Event]] = []  # taken from the queue, not yet returned

    def callback(self, index: int) -> Callable[[Event], None]:
        """Choice `index`'s `on_event` (called on the engine thread)."""
        return lambda ev: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

    async def next(self) -> tuple[int, Event]:
        """The next event of some choice, with that choice's events that have already arrived merged into it
        (fewer, larger chunks)."""
        if not self._ready:
            self._ready.append(await self.queue.get())
        while not self.queue.empty():
            self._ready.append(self.queue.get_nowait())
        index, ev = self._ready.pop(0)
        rest = []
        for j, more in self._ready:
            if j == index and not ev.done:
                ev = Event(text=ev.text + more.text, completion_tokens=more.completion_tokens,
                           finish_reason=more.finish_reason, error=more.error,
                           logprobs=None if ev.logprobs is None and more.logprobs is None
                           else (ev.logprobs or []) + (more.logprobs or []))
            else:
                rest.append((j, more))
        self._ready = rest
        return index, ev


class _CancellingStream(StreamingResponse):
    """A StreamingResponse that cancels its engine requests however the response ends (done, disconnect, error)."""

    def __init__(self, content, engine: Engine, reqs: list[EngineRequest]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._engine, self._reqs = engine, reqs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for req in self._reqs:
                if req.finish_reason is None:
                    self._engine.cancel(req)


def create_app(model, tokenizer, *, model_name: Optional[str] = None, api_key: Optional[str] = None,
               slots: int = DEFAULT_SLOTS, max_seq_len: Optional[int] = None, max_queue: int = DEFAULT_MAX_QUEUE,
               engine: Optional[Engine] = None, prompt_cache_mb: int = DEFAULT_PROMPT_CACHE_MB,
               speculator=None) -> FastAPI:
    """The FastAPI app serving `model` as `model_name` (the command line passes the checkpoint's folder or file
    name, `Loaded.name`). The engine thread starts with the app (lifespan) and stops with it. speculator: a
    `qwen2_pure.speculative` proposer (the command line's --prompt-lookup / --draft-model) for the engine."""
    engine = engine or Engine(model, tokenizer, slots=slots, max_seq_len=max_seq_len, max_queue=max_queue,
                              prompt_cache_mb=prompt_cache_mb, speculator=speculator)
    gen_cfg = model.generation_config  # generation_config.json, read once by the loader
    info = ServerInfo(model_name=model_name or DEFAULT_MODEL_NAME, tokenizer=tokenizer,
                      vocab_size=model.config.vocab_size, max_seq_len=engine.max_seq_len, defaults=gen_cfg.sampling,
                      default_max_tokens=gen_cfg.max_new_tokens, eos_ids=tuple(gen_cfg.eos_token_id),
                      max_n=min(protocol.MAX_N, engine.slots))
    created = protocol.now()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="qwen2-pure", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics(engine, info.model_name)
    app.add_middleware(CountResponses, metrics=metrics)
    app.state.engine, app.state.info, app.state.metrics = engine, info, metrics

    # ---- errors: always OpenAI's shape --------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
        return JSONResponse(APIError(e.status_code, str(message)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal server error: {type(e).__name__}: {e}").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if not api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    # ---- routes ---------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        if not engine.running:
            raise APIError(503, "the generation engine is not running" + (f": {engine.dead}" if engine.dead else ""))
        return {"status": "ok", "model": info.model_name, **engine.load()}

    def model_card() -> dict:
        return {"id": info.model_name, "object": "model", "created": created, "owned_by": "qwen2-pure",
                "max_model_len": info.max_seq_len}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != info.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    async def json_body(request: Request) -> dict:
        # Only JSON (or no content type): a form post from another web site cannot drive the model.
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json"):
            raise APIError(400, f"Content-Type must be application/json, got {kind!r}", code="invalid_json")
        try:
            body = await request.body()
        except ClientDisconnect:  # the client went away while sending: nobody to answer, nothing to log
            raise APIError(499, "client closed the request") from None
        return protocol.parse_json_body(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        gen = protocol.parse_chat(await json_body(request), info)
        return await _answer(request, gen)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        gen = protocol.parse_completion(await json_body(request), info)
        return await _answer(request, gen)

    def _generators(gen: Generation) -> list:
        """Each choice's generator: choice i seeded as row i of `generate(seed=)` (`make_generators`: the seed,
        then a hash of (seed, i)), so choices differ and a request with a seed repeats; None: a random seed."""
        if gen.params.greedy or gen.params.seed is None:
            return [None] * gen.n
        return make_generators(gen.params.seed, gen.n)

    async def _processors(gen: Generation) -> list:
        """Each choice's logits processors: its own grammar matcher when the answer is constrained (built off the
        event loop: the first one also builds the grammar's view of the vocabulary, 2-3 s)."""
        if gen.grammar is None:
            return [()] * gen.n

        def build():
            return [[constrained.processor(tokenizer, info.vocab_size, info.eos_ids, gen.grammar)]
                    for _ in range(gen.n)]
        try:
            return await asyncio.to_thread(build)
        except Qwen2PureError as e:
            raise protocol.bad(str(e), param="response_format") from None

    async def _answer(request: Request, gen: Generation):
        processors = await _processors(gen)
        events = _Events(asyncio.get_running_loop())
        reqs = [EngineRequest(prompt=gen.prompt_ids, max_tokens=gen.max_tokens, params=gen.params, stop=gen.stop,
                              stop_token_ids=gen.stop_token_ids, skip_special_tokens=gen.skip_special_tokens,
                              logprobs=gen.logprobs, generator=generator, on_event=metrics.watch(events.callback(i)),
                              logits_processors=processors[i])
                for i, generator in enumerate(_generators(gen))]
        try:
            for req in reqs:
                engine.submit(req)
        except (QueueFull, EngineStopped, Qwen2PureError) as e:
            for req in reqs:  # all n choices or none
                engine.cancel(req)
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), code="server_busy") from None
            if isinstance(e, EngineStopped):
                raise APIError(503, str(e)) from None
            raise protocol.bad(str(e)) from None
        rid, created_at = protocol.new_id(gen.kind), protocol.now()
        if gen.stream:
            return _CancellingStream(_stream(gen, rid, created_at, events), engine, reqs)
        return await _collect(request, gen, rid, created_at, events, reqs)

    async def _collect(request, gen, rid, created_at, events: _Events, reqs: list[EngineRequest]):
        async def watch_disconnect():  # nothing else reads from a non-streaming client: poll it
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            for req in reqs:
                engine.cancel(req)
            events.queue.put_nowait((0, Event(error=_DISCONNECTED)))

        watcher = asyncio.create_task(watch_disconnect())
        pieces: list[list[str]] = [[] for _ in reqs]
        entries: list[list] = [[] for _ in reqs]  # each choice's TokenLogprobs
        bodies: list[Optional[dict]] = [None] * len(reqs)
        try:
            while any(body is None for body in bodies):
                i, ev = await events.next()
                pieces[i].append(ev.text)
                entries[i] += ev.logprobs or []
                if ev.error == _DISCONNECTED:
                    return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
                if ev.error:
                    raise APIError(500, ev.error, code="generation_failed")
                if ev.done:
                    logprobs = protocol.logprobs_body(gen, entries[i], tokenizer)
                    bodies[i] = protocol.response_body(gen, rid, created_at, "".join(pieces[i]), ev.finish_reason,
                                                       ev.completion_tokens, logprobs=logprobs)
                    if gen.tools is not None:  # read for tool calls (serve/tools.py)
                        bodies[i]["choices"][0] = rewrite_choice(bodies[i]["choices"][0], gen.tools)
            return bodies[0] if len(bodies) == 1 else protocol.merge_choices(bodies)
        finally:
            watcher.cancel()
            for req in reqs:
                if req.finish_reason is None:
                    engine.cancel(req)

    async def _stream(gen: Generation, rid: str, created_at: int, events: _Events) -> AsyncIterator[str]:
        """The choices' chunks as they come, each with its `index`; a chunk carries the logprobs of the tokens
        it covers (a token without text of its own, such as the stop token, gets a chunk with empty text)."""
        if gen.kind == "chat":
            for i in range(gen.n):
                yield protocol.sse(protocol.chunk_body(gen, rid, created_at, role=True, index=i))
        tokens, finished = [0] * gen.n, [False] * gen.n
        tool_streams = [ToolCallStream(incremental=gen.tools.forced) if gen.tools is not None and gen.tools.parse
                        else None for _ in range(gen.n)]
        while not all(finished):
            i, ev = await events.next()
            tokens[i] = ev.completion_tokens or tokens[i]
            if ev.error:
                # the openai client raises APIError for a data line carrying "error"
                yield protocol.sse(APIError(500, ev.error, code="generation_failed").body())
                break
            if tool_streams[i] is not None:  # the text read for tool calls: content and tool_calls deltas
                for data in _tool_chunks(gen, rid, created_at, i, tool_streams[i], ev):
                    yield data
                finished[i] = ev.finish_reason is not None
                continue
            if ev.text or ev.logprobs:
                logprobs = protocol.logprobs_body(gen, ev.logprobs, tokenizer)
                yield protocol.sse(protocol.chunk_body(gen, rid, created_at, text=ev.text, index=i,
                                                       logprobs=logprobs))
            if ev.finish_reason:
                finished[i] = True
                yield protocol.sse(protocol.chunk_body(gen, rid, created_at, finish_reason=ev.finish_reason,
                                                       index=i))
        else:
            if gen.include_usage:
                yield protocol.sse(protocol.chunk_body(gen, rid, created_at, usage_of=sum(tokens)))
        yield protocol.sse("[DONE]")

    def _tool_chunks(gen: Generation, rid: str, created_at: int, i: int, stream: ToolCallStream, ev: Event):
        """The SSE chunks of choice i's event when its text is read for tool calls (`ToolCallStream`): a chunk
        per delta (the event's logprobs on the first), then the finish chunk with the finish_reason it gives."""
        deltas, reason = (stream.push(ev.text) if ev.text else []), None
        if ev.finish_reason:
            more, reason = stream.finish(ev.finish_reason)
            deltas += more
        logprobs = protocol.logprobs_body(gen, ev.logprobs, tokenizer)
        for delta in deltas or ([{"content": ""}] if logprobs else []):
            chunk = protocol.chunk_body(gen, rid, created_at, index=i, logprobs=logprobs)
            chunk["choices"][0]["delta"] = delta  # a content or tool_calls delta (chunk_body writes content only)
            logprobs = None
            yield protocol.sse(chunk)
        if reason:
            yield protocol.sse(protocol.chunk_body(gen, rid, created_at, finish_reason=reason, index=i))

    # ---- tokenizer and metrics endpoints ---------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(request: Request):
        authorize(request)
        return protocol.tokenize_body(await json_body(request), info)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        authorize(request)
        return protocol.detokenize_body(await json_body(request), info)

    @app.get("/metrics")
    async def prometheus_metrics():  # open like /health, as vLLM's: scrapers send no API key
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app


def serve(model, tokenizer, *, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          model_name: Optional[str] = None, slots: int = DEFAULT_SLOTS, max_seq_len: Optional[int] = None,
          max_queue: int = DEFAULT_MAX_QUEUE, log_level: str = "info",
          prompt_cache_mb: int = DEFAULT_PROMPT_CACHE_MB, speculator=None) -> None:
    """Run the server until Ctrl-C (what `qwen2-pure serve` calls)."""
    import uvicorn
    app = create_app(model, tokenizer, model_name=model_name, api_key=api_key, slots=slots,
                     max_seq_len=max_seq_len, max_queue=max_queue, prompt_cache_mb=prompt_cache_mb,
                     speculator=speculator)
    info = app.state.info
    shown = f"[{host}]" if ":" in host else host
    print(f"[serving {info.model_name} on http://{shown}:{port}  (web chat: /, OpenAI API: /v1; "
          f"{app.state.engine.slots} slots of {info.max_seq_len} tokens)]", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("[warning: listening beyond this machine without --api-key: anyone who can reach the port can use "
              "the model]", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)


__all__ = ["create_app", "serve"]
