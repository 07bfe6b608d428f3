"""Tool calls on /v1/chat/completions: Qwen2.5's hermes-style `<tool_call>` blocks <-> OpenAI `tool_calls`.

The format (QwenLM/Qwen2.5 docs/source/framework/function_call.md, "Qwen2.5 function calling templates"):
the chat template lists the tools in the system turn and asks for each call as

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

The model writes zero or more such blocks (joined by "\\n"), optionally after some text, then <|im_end|>.
`<tool_call>` and `</tool_call>` are single, non-special tokens (151657 and 151658), so they stay in the text.

- **Request** (`parse_tools`): `tools`, `tool_choice` ("none", "auto" — the default with tools —, "required",
  {"type": "function", "function": {"name"}}) and `parallel_tool_calls`, as OpenAI defines them. The tools go
  into the prompt whatever the choice (vLLM's default; "none" then only turns the parsing off). History:
  an assistant message's `tool_calls` render through the template with their `arguments` decoded to an
  object (`history_tool_calls`; Qwen2.5's template writes `arguments | tojson`, which would quote OpenAI's
  JSON string a second time), `role: "tool"` messages as the template's `<tool_response>` blocks.
- **Constraint** (`tool_call_lark`, `answer_grammar`): with "required" or a named function, decoding follows
  the grammar `<tool_call> "\\n" {"name": <a declared name>, "arguments": <that function's parameters schema>}
  "\\n" </tool_call>` (one call, or one or more for "required" with parallel calls), the tags as their token
  ids, the JSON from the schema (serve/constrained.py), then only the stop token. llama.cpp builds the same
  grammar for Hermes-style models (common/chat.cpp, `common_chat_params_init_hermes_2_pro`); vLLM instead
  has the model write bare JSON for these choices. "auto" with a `response_format` schema: that JSON or calls.
- **Parsing** (`parse_tool_calls`, `chat_message`): vLLM's hermes parser rules
  (vllm/entrypoints/openai/tool_parsers/hermes_tool_parser.py): the text between `<tool_call>` and
  `</tool_call>`, or from an unclosed `<tool_call>` to the end, must be JSON with a "name"; the content is the
  text before the first block (None if empty); anything malformed and the whole text is plain content,
  never an error, except that for the forced choices a last block cut short by max_tokens is dropped (a
  small model may call again and again: the complete calls stand). With calls, finish_reason is "tool_calls" (llama.cpp's rule; vLLM keeps "stop" for the
  forced choices, which agents that look for "tool_calls" do not expect).
- **Streaming** (`ToolCallStream`): content streams as it comes, except a tail that may be the start of
  `<tool_call>` (and the whitespace before it, which the non-streamed content drops too); each call then goes
  out as OpenAI's deltas, which the openai client assembles: {index, id, type, function: {name, arguments:
  ""}}, then `function.arguments` pieces. For the forced choices (whose blocks the grammar makes valid) the
  header goes out as soon as the name is complete and the arguments as the model writes them; for "auto", a
  call goes out when its block is complete and parses, so a malformed block is never half sent.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Optional

from ..errors import Qwen2PureError
from .constrained import (RequestFieldError, check_grammar, json_grammar, json_schema_for_grammar, lark_grammar,
                          schema_text)

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
CHOICES = ("none", "auto", "required")
# a block's JSON up to where the arguments begin: {"name": "...", "arguments":
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END) + "|"
                    + re.escape(TOOL_CALL_START) + r"(.*)", re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


# ---- the request ------------------------------------------------------------------------------------------------

@dataclass
class ToolSpec:
    """A request's tools: the OpenAI tool objects (for the template), the choice ("none", "auto", "required" or
    "named", with `name`) and whether several calls may come in one answer."""

    tools: list
    choice: str = "auto"
    name: Optional[str] = None
    parallel: bool = True

    @property
    def parse(self) -> bool:
        """The answer is read for tool calls (every choice but "none")."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """Decoding is constrained to tool calls ("required" or a named function)."""
        return self.choice in ("required", "named")

    def functions(self) -> list:
        """The function objects a forced answer may call."""
        fns = [t["function"] for t in self.tools]
        return fns if self.choice != "named" else [f for f in fns if f["name"] == self.name]


def _function(tool, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
            or not isinstance(tool.get("function"), dict):
        raise RequestFieldError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                                "\"parameters\"}}", "tools")
    fn = tool["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestFieldError(f"{where}.function.name must be a non-empty string", "tools")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise RequestFieldError(f"{where}.function.parameters must be a JSON schema object", "tools")
    return fn


def parse_tools(body: dict) -> Optional[ToolSpec]:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls` (None without tools); a RequestFieldError
    names the field at fault."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise RequestFieldError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    names = [_function(t, i)["name"] for i, t in enumerate(tools or [])]
    if len(set(names)) != len(names):
        raise RequestFieldError(f"tools: each function needs its own name (given: {', '.join(names)})", "tools")
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise RequestFieldError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                                    "\"function\": {\"name\": ...}}", "tool_choice")
        if name not in names:
            raise RequestFieldError(f"tool_choice names the function {name!r}, which is not among the tools "
                                    f"({', '.join(names) or 'none given'})", "tool_choice")
        choice = "named"
    elif choice is not None and choice not in CHOICES:
        raise RequestFieldError(f"tool_choice={json.dumps(choice)[:80]} is invalid: it must be 'none', 'auto', "
                                "'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if choice == "required" and not names:
        raise RequestFieldError("tool_choice 'required' needs tools", "tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestFieldError(f"parallel_tool_calls={parallel!r} is invalid: it must be true or false",
                                "parallel_tool_calls")
    if not names:
        return None  # tool_choice 'none' / 'auto' without tools: a plain chat
    return ToolSpec(tools=list(tools), choice=choice or "auto", name=name, parallel=parallel is not False)


def history_tool_calls(tool_calls, i: int) -> list:
    """An assistant message's OpenAI `tool_calls` as the template renders them: {"type", "function": {"name",
    "arguments": object}} (a JSON-string `arguments` decoded; one that is not JSON stays a string)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(tool_calls, list):
        raise RequestFieldError(f"{where} must be a list of tool calls", where)
    out = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestFieldError(f"{where}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                    "\"arguments\"}}}}", where)
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        out.append({**call, "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


# ---- the constraint -----------------------------------------------------------------------------------------------

def _hoist_definitions(schemas: list) -> tuple[list, dict]:
    """The parameter schemas without their `$defs` / `definitions`, and those merged: embedded in a larger
    schema, a "#/$defs/..." reference resolves against the new root, which must hold them."""
    defs, out = {}, []
    for s in schemas:
        s = dict(s)
        for key in ("$defs", "definitions"):
            for name, d in (s.pop(key, None) or {}).items():
                if defs.setdefault((key, name), d) != d:
                    raise RequestFieldError(f"tools: two functions define {key}/{name} differently; give the "
                                            "definitions distinct names", "tools")
        out.append(s)
    merged: dict = {}
    for (key, name), d in defs.items():
        merged.setdefault(key, {})[name] = d
    return out, merged


def call_schema(spec: ToolSpec) -> dict:
    """The JSON schema of one call's object {"name": ..., "arguments": ...} for a forced choice."""
    fns = spec.functions()
    params, defs = _hoist_definitions([f.get("parameters") or NO_PARAMETERS for f in fns])
    options = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": p},
                "required": ["name", "arguments"], "additionalProperties": False} for f, p in zip(fns, params)]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, **defs}


def _tag(tokenizer, text: str) -> str:
    """A Lark item for `text`: its token id when it is one token (as the model was trained), else the text."""
    i = tokenizer.token_to_id(text)
    return f"<[{i}]>" if i is not None else json.dumps(text)


def tool_call_lark(spec: ToolSpec, tokenizer, answer_schema: Optional[dict] = None) -> Optional[str]:
    """The Lark grammar of the answer: forced calls ("required", named); for "auto" only when a
    `response_format` schema is given too (then: JSON valid against it, or calls); else None."""
    if not spec.forced and answer_schema is None:
        return None
    many = spec.choice in ("required", "auto") and spec.parallel
    more = ' ("\\n" call)*' if many else ""  # parallel calls: blocks joined by a newline
    lines = [f"calls: call{more}",
             f"call: {_tag(tokenizer, TOOL_CALL_START)} \"\\n\" body \"\\n\" {_tag(tokenizer, TOOL_CALL_END)}"]
    if spec.forced:
        lines.insert(0, "start: calls")
        lines.append(f"body: %json {schema_text(json_schema_for_grammar(call_schema(spec)))}")
    else:
        forced = ToolSpec(tools=spec.tools, choice="required", parallel=spec.parallel)
        lines.insert(0, "start: calls | answer")
        lines.append(f"body: %json {schema_text(json_schema_for_grammar(call_schema(forced)))}")
        lines.append(f"answer: %json {schema_text(json_schema_for_grammar(answer_schema))}")
    return "\n".join(lines) + "\n"


def answer_grammar(spec: Optional[ToolSpec], answer_schema: Optional[dict], tokenizer) -> Optional[str]:
    """The grammar a request's answer must follow, checked (None: free text): forced tool calls; "auto" tools
    with a `response_format` schema: calls or that JSON; a schema alone: that JSON. A grammar that does not
    compile (an unknown type, an unsupported keyword) is a RequestFieldError naming the field it came from."""
    param = "tools" if spec is not None and spec.forced else "response_format"
    try:
        if spec is not None and spec.parse and (spec.forced or answer_schema is not None):
            grammar = lark_grammar(tool_call_lark(spec, tokenizer, answer_schema))
        elif answer_schema is not None:
            grammar = json_grammar(answer_schema)
        else:
            return None
        error = check_grammar(grammar)
    except RequestFieldError:
        raise
    except (Qwen2PureError, ValueError) as e:  # llguidance missing; a schema that is not JSON-serializable
        raise RequestFieldError(str(e), param) from None
    if error:
        raise RequestFieldError(f"{param}: cannot constrain the answer to this schema: {error}", param)
    return grammar


# ---- the answer -------------------------------------------------------------------------------------------------

def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(obj) -> tuple[str, str]:
    """(name, arguments as a JSON string) of one block's JSON; ValueError when it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("a tool call needs a name")
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        return obj["name"], arguments
    if not isinstance(arguments, dict):
        raise ValueError("a tool call's arguments must be an object")
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def parse_tool_calls(text: str, forced: bool = False) -> tuple[Optional[str], list]:
    """(content, [(name, arguments JSON string)]) of a finished answer; malformed blocks: (text, []).
    forced: the answer of a forced choice, whose grammar makes every complete block valid; a last block cut
    short (by max_tokens) is dropped instead of turning the whole answer into content."""
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return text, []
    blocks = _BLOCK.findall(text, start)
    if forced and len(blocks) > 1 and blocks[-1][1]:
        try:
            json.loads(blocks[-1][1])
        except ValueError:
            blocks = blocks[:-1]
    try:
        calls = [_call(json.loads(closed or unclosed)) for closed, unclosed in blocks]
    except ValueError:  # json's errors are ValueErrors too
        return text, []
    content = text[:start].rstrip()
    return content or None, calls


def tool_call_json(name: str, arguments: str, call_id: Optional[str] = None) -> dict:
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_message(text: str, finish_reason: str, spec: Optional[ToolSpec]) -> tuple[dict, str]:
    """The assistant message of a finished answer, and its finish_reason ("tool_calls" when it calls tools and
    ended by itself)."""
    message = {"role": "assistant", "content": text}
    if spec is None or not spec.parse:
        return message, finish_reason
    content, calls = parse_tool_calls(text, forced=spec.forced)
    if not calls:
        return message, finish_reason
    message = {"role": "assistant", "content": content,
               "tool_calls": [tool_call_json(name, args) for name, args in calls]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


def rewrite_choice(choice: dict, spec: Optional[ToolSpec]) -> dict:
    """A response body's chat choice with its content read for tool calls (`chat_message`)."""
    if spec is None or not spec.parse:
        return choice
    message, reason = chat_message(choice["message"].get("content") or "", choice["finish_reason"], spec)
    return {**choice, "message": {**choice["message"], **message}, "finish_reason": reason}


class _StreamedCall:
    def __init__(self, args_start: int):
        self.args_start, self.sent, self.done = args_start, 0, False
        self.id = new_call_id()


def _before_partial(text: str, tag: str) -> str:
    """`text` without a tail that may be the beginning of `tag` (the rest of it not written yet)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return text[:-k]
    return text


def _content_end(text: str) -> int:
    """How much of `text` may go out as content now: not a tail that may begin `<tool_call>`, nor the
    whitespace before it (a tool call would drop it)."""
    return len(_before_partial(text, TOOL_CALL_START).rstrip())


def _arguments_end(rest: str) -> int:
    """How much of a block's text after `"arguments": ` is surely the arguments: not the trailing whitespace,
    nor a last "}" that may close the call's object."""
    s = rest.rstrip()
    if s.endswith("}"):
        s = s[:-1].rstrip()
    return len(s)


def _header(index: int, call_id: str, name: str, arguments: str = "") -> dict:
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def _arguments(index: int, piece: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


class ToolCallStream:
    """An answer's text pieces in, chat deltas out ({"content"} or {"tool_calls": [...]}); `finish(reason)` gives
    the last deltas and the finish_reason.

    Content streams until `<tool_call>`. Then, with `incremental` (the forced choices, whose grammar makes every
    block valid), a call's header goes out once its name is complete and its arguments as the model writes
    them. Without it ("auto"), a call goes out when its block is complete and parses (header, then the
    arguments), so that a malformed block is never half sent: if the first one is malformed the whole answer is
    content, as the non-streamed message says. Where the two differ: a malformed block after valid ones
    (already sent): the stream keeps the calls sent and gives the text from that block on as content, where the
    non-streamed message, all or nothing as vLLM's, is all content; and a forced call cut short by max_tokens,
    whose beginning was sent, where the non-streamed message drops it.
    """

    def __init__(self, incremental: bool = False):
        self.incremental = incremental
        self.text = ""
        self.sent = 0  # characters of content sent
        self.calls: list[_StreamedCall] = []
        self.stalled = False  # a block could not be sent: the rest waits for `finish`

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        start = self.text.find(TOOL_CALL_START)
        out = []
        end = _content_end(self.text) if start < 0 else len(self.text[:start].rstrip())
        if end > self.sent:
            out.append({"content": self.text[self.sent:end]})
            self.sent = end
        if start >= 0 and not self.stalled:
            blocks = self.text[start:].split(TOOL_CALL_START)[1:]
            out += self._incremental(blocks) if self.incremental else self._whole(blocks)
        return out

    def _whole(self, blocks: list[str]) -> list[dict]:
        """Each complete block that parses, as a header and its arguments."""
        out = []
        for j in range(len(self.calls), len(blocks)):
            if TOOL_CALL_END not in blocks[j]:
                break
            try:
                name, arguments = _call(json.loads(blocks[j].split(TOOL_CALL_END)[0]))
            except ValueError:
                self.stalled = True
                break
            call = _StreamedCall(0)
            call.done = True
            self.calls.append(call)
            out += [_header(j, call.id, name), _arguments(j, arguments)]
        return out

    def _incremental(self, blocks: list[str]) -> list[dict]:
        """Headers as soon as the name is complete, arguments as they come."""
        out = []
        for j, block in enumerate(blocks):
            closed = TOOL_CALL_END in block
            body = block.split(TOOL_CALL_END)[0] if closed else _before_partial(block, TOOL_CALL_END)
            if j == len(self.calls):  # a new block: its header once the name is complete
                m = _HEADER.match(body)
                try:
                    name = json.loads('"' + m.group(1) + '"') if m else None
                except ValueError:
                    name = None
                if name is None:
                    self.stalled = closed  # not in the expected layout: `finish` sends it whole
                    break
                self.calls.append(_StreamedCall(m.end()))
                out.append(_header(j, self.calls[j].id, name))
            call = self.calls[j]
            if call.done:
                continue
            rest = body[call.args_start:]
            if call.sent == 0 and rest.strip():  # whitespace after the colon that came after the header matched
                lead = len(rest) - len(rest.lstrip())
                call.args_start += lead
                rest = rest[lead:]
            if rest.strip() and not rest.lstrip().startswith("{"):  # not an object (a JSON string?): at the end
                self.stalled = closed
                break
            end = _arguments_end(rest)
            if end > call.sent:
                out.append(_arguments(j, rest[call.sent:end]))
                call.sent = end
            call.done = closed
            if not closed:
                break
        return out

    def finish(self, finish_reason: str) -> tuple[list[dict], str]:
        content, calls = parse_tool_calls(self.text, forced=self.incremental)
        out = []
        if not self.calls and not calls:  # plain text after all: whatever was held back
            if len(self.text) > self.sent:
                out.append({"content": self.text[self.sent:]})
            return out, finish_reason
        if calls:  # the calls not sent yet (an unclosed last block; a layout `incremental` could not follow)
            for j, (name, arguments) in enumerate(calls):
                if j >= len(self.calls):
                    out.append(_header(j, new_call_id(), name, arguments))
                elif self.calls[j].sent == 0 and not self.calls[j].done:
                    out.append(_arguments(j, arguments))
        elif not self.incremental:  # a malformed block after the calls sent: it and the rest as content
            at = -1
            for _ in range(len(self.calls) + 1):  # the start of the first block not sent
                at = self.text.find(TOOL_CALL_START, at + 1)
            out.append({"content": self.text[at:]})
        return out, "tool_calls" if finish_reason == "stop" else finish_reason


__all__ = ["TOOL_CALL_END", "TOOL_CALL_START", "ToolCallStream", "ToolSpec", "answer_grammar", "call_schema",
           "chat_message", "history_tool_calls", "parse_tool_calls", "parse_tools", "rewrite_choice",
           "tool_call_json", "tool_call_lark"]
