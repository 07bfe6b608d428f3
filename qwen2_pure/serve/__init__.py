"""Serving: an OpenAI-compatible HTTP API and a web chat page over a continuous-batching engine.

    engine.py    the engine thread: one static KV cache, every running request in the same decode steps
    protocol.py  the OpenAI wire format: request validation, response and chunk bodies, error bodies
    app.py       FastAPI routes, server-sent events, client disconnects, `serve()` (uvicorn)
    tools.py     tool calls: Qwen's `<tool_call>` blocks <-> OpenAI `tool_calls`, streamed; forced-call grammars
    constrained.py  grammars (JSON schema, Lark) as logits processors, through llguidance (the `serve` extra)
    static/      the web chat page (plain HTML/CSS/JS, no build step)

`engine` and `protocol` need only torch; `app` needs the `serve` extra (fastapi, uvicorn).
"""

from .engine import Engine, Event, Request

__all__ = ["Engine", "Event", "Request", "create_app", "serve"]


def __getattr__(name):  # create_app / serve import fastapi only when asked for
    if name in ("create_app", "serve"):
        from . import app
        return getattr(app, name)
    raise AttributeError(name)
