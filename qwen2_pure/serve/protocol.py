"""The OpenAI wire format: request validation into engine requests, response and chunk bodies, error bodies.

Pure functions over dicts, no web framework, so every rule is testable on its own. The request fields and
their meanings follow OpenAI's Chat Completions / Completions API and vLLM's extensions (top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos, skip_special_tokens); a field we do not know is ignored, as
vLLM does, but a known field asking for something we cannot do (n > 1, logprobs, tools, ...) is a 400 that
names it. Sampling defaults come from the model's generation_config.json (transformers' reading of it, as
the CLI does); the request's fields override them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any, Optional

from ..errors import Qwen2PureError
from ..sampling import SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# ---- field checks -------------------------------------------------------------------------------------------

def _number(body: dict, name: str, low: float, high: float, low_open=False, high_open=False) -> Optional[float]:
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        high_text = "inf" if math.isinf(high) else f"{high:g}"
        raise bad(f"{name}={v!r} is invalid: it must be a number in {lo}{low:g}, {high_text}{hi}", param=name)
    return float(v)


def _integer(body: dict, name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        raise bad(f"{name}={v!r} is invalid: it must be an integer >= {low}"
                  + (f" and <= {high}" if high is not None else ""), param=name)
    return v


def _boolean(body: dict, name: str) -> Optional[bool]:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(f"{name}={v!r} is invalid: it must be true or false", param=name)
    return v


def _reject(body: dict, name: str, what: str = "") -> None:
    """400 for a field that asks for a feature we do not have; absent, null, false, [] and {} are fine."""
    v = body.get(name)
    if v is None or v is False or v == [] or v == {}:
        return
    raise bad(f"{name}={json.dumps(v)[:80]} is not supported by this server{what}", param=name,
              code="unsupported_parameter")


# ---- the generation request -----------------------------------------------------------------------------------

@dataclass
class ServerInfo:
    """What request parsing needs to know about the served model."""

    model_name: str
    tokenizer: Any
    vocab_size: int
    max_seq_len: int  # prompt + answer, per request (the engine's cache slots per row)
    defaults: SamplingParams = field(default_factory=SamplingParams)
    default_max_tokens: Optional[int] = None  # generation_config's max_new_tokens
    eos_ids: tuple = ()  # generation_config's eos ids: what ends an answer unless ignore_eos


@dataclass
class Generation:
    """A validated request: what the engine needs plus how to answer."""

    kind: str  # "chat" | "completion"
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    stop_token_ids: Optional[list[int]]
    skip_special_tokens: bool
    stream: bool
    include_usage: bool
    model: str


def _check_model(body: dict, info: ServerInfo) -> str:
    model = body.get("model")
    if model is None:
        return info.model_name
    if not isinstance(model, str):
        raise bad(f"model={model!r} is invalid: it must be a string", param="model")
    if model != info.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{info.model_name}'",
                       param="model", code="model_not_found")
    return model


def _sampling(body: dict, info: ServerInfo) -> SamplingParams:
    over: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0, math.inf),
        "top_p": _number(body, "top_p", 0, 1, low_open=True),
        "min_p": _number(body, "min_p", 0, 1),
        "repetition_penalty": _number(body, "repetition_penalty", 0, math.inf, low_open=True),
        "presence_penalty": _number(body, "presence_penalty", -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2),
        "seed": _integer(body, "seed", -(2 ** 63), 2 ** 64 - 1),
    }
    top_k = _integer(body, "top_k", -1)
    over["top_k"] = None if top_k is None else max(top_k, 0)  # vLLM spells "off" -1, transformers 0
    try:
        return replace(info.defaults, **{k: v for k, v in over.items() if v is not None}).validate()
    except Qwen2PureError as e:
        raise bad(str(e)) from None


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS \
            or not all(isinstance(s, str) and s for s in items):
        raise bad(f"stop={json.dumps(stop)[:80]} is invalid: it must be a non-empty string or a list of at most "
                  f"{MAX_STOP_STRINGS} non-empty strings", param="stop")
    return list(items)


def _stop_token_ids(body: dict, info: ServerInfo) -> Optional[list[int]]:
    ids = body.get("stop_token_ids")
    if ids is not None and (not isinstance(ids, list)
                            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < info.vocab_size
                                       for i in ids)):
        raise bad(f"stop_token_ids={json.dumps(ids)[:80]} is invalid: it must be a list of token ids in "
                  f"[0, {info.vocab_size})", param="stop_token_ids")
    if _boolean(body, "ignore_eos"):
        return list(ids or [])
    if ids:
        return sorted(set(ids) | set(info.eos_ids))
    return None


def _common(body: dict, info: ServerInfo, kind: str, prompt_ids: list[int], prompt_param: str) -> Generation:
    model = _check_model(body, info)
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad(f"n={n} is not supported: this server returns one choice (n=1)", param="n",
                  code="unsupported_parameter")
    if body.get("best_of") != 1:
        _reject(body, "best_of")
    for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix", "echo"):
        _reject(body, name)
    if body.get("tool_choice") not in ("none", "auto"):
        _reject(body, "tool_choice")
    if body.get("response_format") != {"type": "text"}:
        _reject(body, "response_format", what=' (only {"type": "text"})')
    stream = bool(_boolean(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options must be an object such as {\"include_usage\": true}", param="stream_options")
        if not stream:
            raise bad("stream_options is only allowed when stream is true", param="stream_options")
        include_usage = bool(_boolean(opts, "include_usage"))
    params = _sampling(body, info)
    stop = _stop_strings(body)
    stop_ids = _stop_token_ids(body, info)
    skip = _boolean(body, "skip_special_tokens")
    skip = True if skip is None else skip

    P, T = len(prompt_ids), info.max_seq_len
    if P == 0:
        raise bad("the prompt is empty", param=prompt_param)
    if P >= T:
        raise bad(f"This model's maximum context length is {T} tokens. However, your {prompt_param} resulted in "
                  f"{P} tokens, which leaves no room for an answer.", param=prompt_param,
                  code="context_length_exceeded")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    if max_tokens is None:
        max_tokens = min(info.default_max_tokens or T - P, T - P)
    elif P + max_tokens > T:
        raise bad(f"This model's maximum context length is {T} tokens. However, you requested {P + max_tokens} "
                  f"tokens ({P} in the {prompt_param}, {max_tokens} in max_tokens for the completion). Please "
                  f"reduce the length of the {prompt_param} or max_tokens.", param="max_tokens",
                  code="context_length_exceeded")
    return Generation(kind=kind, prompt_ids=prompt_ids, max_tokens=max_tokens, params=params, stop=stop,
                      stop_token_ids=stop_ids, skip_special_tokens=skip, stream=stream,
                      include_usage=include_usage, model=model)


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}].content[{j}] is a {kind!r} part; only text parts "
                          "({\"type\": \"text\", \"text\": ...}) are supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_chat(body: dict, info: ServerInfo) -> Generation:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role={role!r} is invalid: it must be one of {', '.join(CHAT_ROLES)}",
                      param=f"messages[{i}].role")
        content = m.get("content")
        if content is None and role != "assistant":
            raise bad(f"messages[{i}] ({role}) has no content", param=f"messages[{i}].content")
        if m.get("tool_calls"):
            raise bad(f"messages[{i}].tool_calls: tool calls are not supported by this server",
                      param=f"messages[{i}].tool_calls", code="unsupported_parameter")
        chat.append({"role": role, "content": "" if content is None else _message_text(content, i)})
    add_generation_prompt = _boolean(body, "add_generation_prompt")
    try:
        text = info.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt)
    except Qwen2PureError as e:
        raise bad(str(e), param="messages") from None
    return _common(body, info, "chat", info.tokenizer.encode(text), "messages")


def parse_completion(body: dict, info: ServerInfo) -> Generation:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = info.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad_ids = [t for t in prompt if not 0 <= t < info.vocab_size]
        if bad_ids:
            raise bad(f"prompt contains token id {bad_ids[0]}, outside the vocabulary [0, {info.vocab_size})",
                      param="prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt: a batch of several prompts is not supported; send one request per prompt",
                  param="prompt", code="unsupported_parameter")
    else:
        raise bad("prompt must be a non-empty string or a list of token ids", param="prompt")
    return _common(body, info, "completion", ids, "prompt")


# ---- response bodies ----------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(gen: Generation, rid: str, created: int, text: str, finish_reason: str,
                  completion_tokens: int) -> dict:
    if gen.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": gen.model, "choices": [choice],
            "usage": usage(len(gen.prompt_ids), completion_tokens)}


def chunk_body(gen: Generation, rid: str, created: int, *, text: Optional[str] = None, role: bool = False,
               finish_reason: Optional[str] = None, usage_of: Optional[int] = None) -> dict:
    """One streamed chunk: the role chunk, a content chunk, the finish chunk, or (usage_of=tokens) the usage."""
    obj = "chat.completion.chunk" if gen.kind == "chat" else "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": gen.model}
    if usage_of is not None:
        out["choices"] = []
        out["usage"] = usage(len(gen.prompt_ids), usage_of)
        return out
    if gen.kind == "chat":
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out["choices"] = [choice]
    return out


def sse(data) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return "data: " + text + "\n\n"


def now() -> int:
    return int(time.time())
