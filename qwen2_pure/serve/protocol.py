"""The OpenAI wire format: request validation into engine requests, response and chunk bodies, error bodies.

Pure functions over dicts, no web framework, so every rule is testable on its own. The request fields and
their meanings follow OpenAI's Chat Completions / Completions API and vLLM's extensions (top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos, skip_special_tokens); a field we do not know is ignored, as
vLLM does, but a known field asking for something we cannot do (best_of > 1, echo, ...) is a 400 that
names it. Sampling defaults come from the model's generation_config.json (transformers' reading of it, as
the CLI does); the request's fields override them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from functools import lru_cache
from numbers import Real
from typing import Any, Optional

from ..errors import Qwen2PureError
from ..loading.gguf_tokenizer import _bytes_to_unicode  # GPT-2's byte <-> character map of byte-level BPE
from ..sampling import SamplingParams
from .constrained import RequestFieldError, response_format_schema
from .tools import ToolSpec, answer_grammar, history_tool_calls, parse_tools

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_N = 16  # choices per request (and at most the engine's slots)
# top log-probabilities per token: OpenAI's chat limit and vLLM's default --max-logprobs, for both endpoints
# (OpenAI caps the legacy completions' `logprobs` at 5; vLLM allows up to its --max-logprobs, as we do)
MAX_LOGPROBS = 20
# Qwen2.5-Coder's fill-in-the-middle tokens (QwenLM/Qwen2.5-Coder README, "File-Level Code Completion")
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# what ends the middle: the stop list of Qwen's own example (examples/Qwen2.5-Coder-fim.py), by text
FIM_STOP_TOKENS = ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                   "<|repo_name|>", "<|file_sep|>", "<|im_end|>")


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
    max_n: int = MAX_N  # the most choices (`n`) a request may ask for


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
    n: int = 1  # choices, each its own engine request
    logprobs: Optional[int] = None  # None: no log-probabilities; k: each token's and the k most likely tokens'
    tools: Optional[ToolSpec] = None  # a chat with tools: its answer is read for tool calls (serve/tools.py)
    grammar: Optional[str] = None  # what the answer must follow (response_format, forced tool calls), llguidance's


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
    n = _integer(body, "n", 1, info.max_n) or 1
    if body.get("best_of") != 1:
        _reject(body, "best_of")
    for name in ("logit_bias", "functions", "echo"):
        _reject(body, name)
    spec, grammar = _constraint(body, info, kind)
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
                      include_usage=include_usage, model=model, n=n, logprobs=_logprobs(body, kind),
                      tools=spec, grammar=grammar)


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
    return _common(body, info, "chat", chat_prompt_ids(body, info), "messages")


def chat_prompt_ids(body: dict, info: ServerInfo) -> list[int]:
    """The token ids of body's `messages` rendered by the chat template: what /v1/chat/completions feeds the
    model and /tokenize counts."""
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
        chat.append({"role": role, "content": "" if content is None else _message_text(content, i),
                     **_history_tool_calls(m, role, i)})
    add_generation_prompt = _boolean(body, "add_generation_prompt")
    spec = _tools(body)
    try:
        text = info.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
            tools=None if spec is None else spec.tools)
    except Qwen2PureError as e:
        raise bad(str(e), param="messages") from None
    return info.tokenizer.encode(text)


# ---- tools and structured output (serve/tools.py, serve/constrained.py) ---------------------------------------

def _tools(body: dict) -> Optional[ToolSpec]:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls` (None without tools)."""
    try:
        return parse_tools(body)
    except RequestFieldError as e:
        raise bad(str(e), param=e.param) from None


def _history_tool_calls(m: dict, role: str, i: int) -> dict:
    """{"tool_calls": [...]} of an assistant message that made calls, as the template renders them; {} else."""
    if not m.get("tool_calls"):
        return {}
    if role != "assistant":
        raise bad(f"messages[{i}].tool_calls: only an assistant message carries tool calls",
                  param=f"messages[{i}].tool_calls")
    try:
        return {"tool_calls": history_tool_calls(m["tool_calls"], i)}
    except RequestFieldError as e:
        raise bad(str(e), param=e.param) from None


def _constraint(body: dict, info: ServerInfo, kind: str) -> tuple[Optional[ToolSpec], Optional[str]]:
    """The request's tools (chat only) and the grammar its answer must follow (None: free text), from `tools`,
    `tool_choice`, `parallel_tool_calls` and `response_format`."""
    if kind != "chat":
        _reject(body, "tools")
        if body.get("tool_choice") not in ("none", "auto"):
            _reject(body, "tool_choice")
    spec = _tools(body) if kind == "chat" else None
    try:
        grammar = answer_grammar(spec, response_format_schema(body.get("response_format")), info.tokenizer)
    except RequestFieldError as e:
        raise bad(str(e), param=e.param) from None
    if grammar is not None and _boolean(body, "ignore_eos"):
        raise bad("ignore_eos cannot be combined with a constrained answer (response_format, tool_choice 'required' "
                  "or a named function): the stop token is what ends it", param="ignore_eos")
    return spec, grammar


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
    suffix = body.get("suffix")
    if suffix is None:
        return _common(body, info, "completion", ids, "prompt")
    fim = fim_token_ids(info.tokenizer, suffix)
    if isinstance(prompt, str):
        ids = info.tokenizer.encode(fim_prompt(prompt, suffix))
    else:
        ids = [fim[FIM_PREFIX]] + ids + [fim[FIM_SUFFIX]] + info.tokenizer.encode(suffix) + [fim[FIM_MIDDLE]]
    gen = _common(body, info, "completion", ids, "prompt")
    if not _boolean(body, "ignore_eos"):  # the middle ends at the end-of-text token or any FIM/repo token
        gen.stop_token_ids, extra = _fim_stops(info, gen.stop_token_ids)
        gen.stop = gen.stop + [s for s in extra if s not in gen.stop]
    return gen


# ---- fill-in-the-middle (Qwen2.5-Coder) -------------------------------------------------------------------------

def fim_prompt(prefix: str, suffix: str) -> str:
    """Qwen2.5-Coder's file-level fill-in-the-middle prompt (prefix-suffix-middle order), as its README gives it
    (QwenLM/Qwen2.5-Coder, "File-Level Code Completion (Fill in the middle)"):
    `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`; the model writes the middle."""
    return FIM_PREFIX + prefix + FIM_SUFFIX + suffix + FIM_MIDDLE


def fim_token_ids(tokenizer, suffix) -> dict:
    """{token: id} of the three FIM tokens, or a 400 naming `suffix` (a string is needed, and a tokenizer that has
    them: Qwen2.5-Coder's)."""
    if not isinstance(suffix, str):
        raise bad(f"suffix={json.dumps(suffix)[:80]} is invalid: it must be a string (the text after the insertion "
                  "point)", param="suffix")
    ids = {t: tokenizer.token_to_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise bad(f"suffix needs a model trained for fill-in-the-middle: this tokenizer has no {', '.join(missing)} "
                  "token (Qwen2.5-Coder's have them); send the prompt without suffix", param="suffix",
                  code="unsupported_parameter")
    return ids


def _fim_stops(info: ServerInfo, stop_token_ids: Optional[list[int]]) -> tuple[list[int], list[str]]:
    """The stop ids of a FIM request (the request's, else the eos ids, plus every FIM stop token the tokenizer has)
    and the stop strings that keep a non-special one's text out of the answer (skip_special_tokens keeps it)."""
    tok = info.tokenizer
    found = {t: i for t in FIM_STOP_TOKENS if (i := tok.token_to_id(t)) is not None}
    ids = set(info.eos_ids if stop_token_ids is None else stop_token_ids) | set(found.values())
    special = getattr(tok, "special_token_ids", frozenset())
    return sorted(ids), [t for t, i in found.items() if i not in special]


# ---- log-probabilities ----------------------------------------------------------------------------------------

def _logprobs(body: dict, kind: str) -> Optional[int]:
    """How many top log-probabilities a token gets (None: no logprobs). Chat: `logprobs` true/false and
    `top_logprobs` 0..20 (which needs logprobs true); completions: `logprobs` 0..20."""
    if kind != "chat":
        return _integer(body, "logprobs", 0, MAX_LOGPROBS)
    want = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top and not want:
        raise bad(f"top_logprobs={top} needs logprobs: true", param="top_logprobs")
    return (top or 0) if want else None


@lru_cache(maxsize=1)
def _byte_of_char() -> dict:
    return {c: b for b, c in _bytes_to_unicode().items()}


def token_text(tokenizer, token_id: int) -> str:
    """A token on its own, as vLLM shows it in logprobs: `tokenizer.decode([id])`, special tokens included
    (vllm `convert_ids_list_to_tokens`); a piece of a UTF-8 character decodes to U+FFFD."""
    return tokenizer.decode([token_id])


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """The token's own UTF-8 bytes (OpenAI's `bytes`: a character split over several tokens is the concatenation
    of their bytes). From the byte-level piece when the text alone lost them (U+FFFD); vLLM encodes the text."""
    if "\ufffd" in text:
        piece, table = tokenizer.id_to_token(token_id) or "", _byte_of_char()
        if piece and all(c in table for c in piece):
            return [table[c] for c in piece]
    return list(text.encode("utf-8"))


def _clamp(logprob: float) -> float:
    return max(float(logprob), -9999.0)  # -inf is not JSON; -9999.0 is OpenAI's and vLLM's "very unlikely"


def chat_logprobs(entries, tokenizer) -> dict:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}
    for `entries`, the engine's TokenLogprob of each token (the stop token included)."""
    def item(token_id, logprob):
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": _clamp(logprob), "bytes": token_bytes(tokenizer, token_id, text)}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries, tokenizer) -> dict:
    """The legacy completions' `logprobs`: {tokens, token_logprobs, top_logprobs: [{token: logprob}],
    text_offset}; each top dict also holds the sampled token (so it may have k + 1 entries, as OpenAI's and
    vLLM's), and text_offset counts characters from the start of the returned text (vLLM's convention)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(token_text(tokenizer, e.token))
        out["token_logprobs"].append(_clamp(e.logprob))
        top = {token_text(tokenizer, i): _clamp(lp) for i, lp in e.top}
        top.setdefault(out["tokens"][-1], _clamp(e.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(e.offset)
    return out


def logprobs_body(gen: Generation, entries, tokenizer) -> Optional[dict]:
    """The `logprobs` of a choice or chunk (None when the request asked for none)."""
    if gen.logprobs is None or entries is None:
        return None
    return (chat_logprobs if gen.kind == "chat" else completion_logprobs)(entries, tokenizer)


# ---- /tokenize and /detokenize (vLLM's shapes; llama.cpp's field names accepted) ----------------------------------

def tokenize_body(body: dict, info: ServerInfo) -> dict:
    """POST /tokenize: {"prompt": text} (llama.cpp: "content"), or {"messages", "add_generation_prompt"} rendered
    exactly as /v1/chat/completions renders them, -> {"count", "max_model_len", "tokens"}, plus "token_strs"
    (the byte-level pieces) with "return_token_strs": true, as vLLM's TokenizeResponse."""
    _check_model(body, info)
    prompt = body.get("prompt", body.get("content"))
    if body.get("messages") is not None:
        if prompt is not None:
            raise bad("give either prompt or messages, not both", param="prompt")
        ids = chat_prompt_ids(body, info)
    elif isinstance(prompt, str):
        ids = info.tokenizer.encode(prompt)
    else:
        raise bad("prompt must be a string (or give messages, a chat to render with the chat template)",
                  param="prompt")
    out = {"count": len(ids), "max_model_len": info.max_seq_len, "tokens": ids}
    if _boolean(body, "return_token_strs"):
        out["token_strs"] = [info.tokenizer.id_to_token(i) or "" for i in ids]
    return out


def detokenize_body(body: dict, info: ServerInfo) -> dict:
    """POST /detokenize: {"tokens": [ids]} -> the text, special tokens kept (vLLM's `decode` default), as vLLM's
    "prompt" and llama.cpp's "content"."""
    _check_model(body, info)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               and 0 <= t < info.vocab_size for t in tokens):
        raise bad(f"tokens={json.dumps(tokens)[:80]} is invalid: it must be a list of token ids in "
                  f"[0, {info.vocab_size})", param="tokens")
    text = info.tokenizer.decode(tokens)
    return {"prompt": text, "content": text}


# ---- response bodies ----------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(gen: Generation, rid: str, created: int, text: str, finish_reason: str,
                  completion_tokens: int, logprobs: Optional[dict] = None) -> dict:
    if gen.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": gen.model, "choices": [choice],
            "usage": usage(len(gen.prompt_ids), completion_tokens)}


def merge_choices(bodies: list[dict]) -> dict:
    """One response from the single-choice responses of a request's n choices: choices indexed 0..n-1, usage
    with the prompt counted once and the completion tokens summed (as OpenAI and vLLM report n > 1)."""
    out = dict(bodies[0])
    out["choices"] = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
    out["usage"] = usage(bodies[0]["usage"]["prompt_tokens"], sum(b["usage"]["completion_tokens"] for b in bodies))
    return out


def chunk_body(gen: Generation, rid: str, created: int, *, text: Optional[str] = None, role: bool = False,
               finish_reason: Optional[str] = None, usage_of: Optional[int] = None, index: int = 0,
               logprobs: Optional[dict] = None) -> dict:
    """One streamed chunk of choice `index`: the role chunk, a content chunk (with its tokens' `logprobs`), the
    finish chunk, or (usage_of=tokens) the usage."""
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
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    out["choices"] = [choice]
    return out


def sse(data) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return "data: " + text + "\n\n"


def now() -> int:
    return int(time.time())
