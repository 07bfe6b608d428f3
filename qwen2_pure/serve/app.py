"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) and the web chat page.

    GET  /                      the web chat (static files in serve/static, no build step)
    GET  /health                {"status": "ok", running/waiting requests, counters}; 503 if the engine died
    GET  /v1/models             the one served model
    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        plain completion, streamed or not

Requests are validated by `protocol`, then handed to the `Engine`, whose thread batches every running request
into the same decode steps. Each request's events cross from the engine thread to the event loop through an
asyncio queue. A client that disconnects cancels its request, which frees its cache row before the next step.
Every error is answered as OpenAI does ({"error": {...}} with the right status) and never stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Qwen2PureError
from . import protocol
from .engine import DEFAULT_MAX_QUEUE, DEFAULT_PROMPT_CACHE_MB, DEFAULT_SLOTS, Engine, EngineStopped, Event, QueueFull
from .engine import Request as EngineRequest
from .protocol import APIError, Generation, ServerInfo

log = logging.getLogger("qwen2_pure.serve")
STATIC = Path(__file__).with_name("static")
_DISCONNECTED = "client disconnected"
DEFAULT_MODEL_NAME = "qwen2"  # the id /v1/models lists when the caller names none (the CLI passes the checkpoint's)


class _Events:
    """The engine thread's events for one request, as an async iterator on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, ev: Event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def next(self) -> Event:
        """The next event, with whatever else has already arrived merged into it (fewer, larger chunks)."""
        ev = await self.queue.get()
        while not ev.done and not self.queue.empty():
            more = self.queue.get_nowait()
            ev = Event(text=ev.text + more.text, completion_tokens=more.completion_tokens,
                       finish_reason=more.finish_reason, error=more.error)
        return ev


class _CancellingStream(StreamingResponse):
    """A StreamingResponse that cancels its engine request however the response ends (done, disconnect, error)."""

    def __init__(self, content, engine: Engine, req: EngineRequest):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._engine, self._req = engine, req

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._req.finish_reason is None:
                self._engine.cancel(self._req)


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
                      default_max_tokens=gen_cfg.max_new_tokens, eos_ids=tuple(gen_cfg.eos_token_id))
    created = protocol.now()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="qwen2-pure", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.info = engine, info

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
        return protocol.parse_json_body(await request.body())

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

    async def _answer(request: Request, gen: Generation):
        events = _Events(asyncio.get_running_loop())
        req = EngineRequest(prompt=gen.prompt_ids, max_tokens=gen.max_tokens, params=gen.params, stop=gen.stop,
                            stop_token_ids=gen.stop_token_ids, skip_special_tokens=gen.skip_special_tokens,
                            on_event=events)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), code="server_busy") from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        except Qwen2PureError as e:
            raise protocol.bad(str(e)) from None
        rid, created_at = protocol.new_id(gen.kind), protocol.now()
        if gen.stream:
            return _CancellingStream(_stream(gen, rid, created_at, events), engine, req)
        return await _collect(request, gen, rid, created_at, events, req)

    async def _collect(request, gen, rid, created_at, events: _Events, req: EngineRequest):
        async def watch_disconnect():  # nothing else reads from a non-streaming client: poll it
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            engine.cancel(req)
            events.queue.put_nowait(Event(error=_DISCONNECTED))

        watcher = asyncio.create_task(watch_disconnect())
        pieces: list[str] = []
        try:
            while True:
                ev = await events.next()
                pieces.append(ev.text)
                if ev.error == _DISCONNECTED:
                    return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
                if ev.error:
                    raise APIError(500, ev.error, code="generation_failed")
                if ev.done:
                    return protocol.response_body(gen, rid, created_at, "".join(pieces), ev.finish_reason,
                                                  ev.completion_tokens)
        finally:
            watcher.cancel()
            if req.finish_reason is None:
                engine.cancel(req)

    async def _stream(gen: Generation, rid: str, created_at: int, events: _Events) -> AsyncIterator[str]:
        if gen.kind == "chat":
            yield protocol.sse(protocol.chunk_body(gen, rid, created_at, role=True))
        tokens = 0
        while True:
            ev = await events.next()
            tokens = ev.completion_tokens or tokens
            if ev.error:
                # the openai client raises APIError for a data line carrying "error"
                yield protocol.sse(APIError(500, ev.error, code="generation_failed").body())
                break
            if ev.text:
                yield protocol.sse(protocol.chunk_body(gen, rid, created_at, text=ev.text))
            if ev.finish_reason:
                yield protocol.sse(protocol.chunk_body(gen, rid, created_at, finish_reason=ev.finish_reason))
                if gen.include_usage:
                    yield protocol.sse(protocol.chunk_body(gen, rid, created_at, usage_of=tokens))
                break
        yield protocol.sse("[DONE]")

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
