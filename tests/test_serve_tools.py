"""Tool calls and structured output on the server (qwen2_pure/serve/tools.py, serve/constrained.py).

The model is tests/test_serve.py's tiny random Qwen2 with the real Qwen2.5 tokenizer: left alone it writes
gibberish, so whatever valid JSON or tool call comes out is the grammar's doing. Three ways to drive it:
- as it is (sampled with a seed): forced tool calls and schemas whose strings are bounded (`maxLength`), since
  the model's loud word tokens would otherwise fill a string for ever;
- `noise`: its logits replaced by seeded noise with closing tokens (`"`, `}`, `]`, ...) favoured, so that
  unbounded strings and free objects (json_object) end;
- `scripted`: its logits replaced by a fixed answer's tokens, to see what the parser makes of a given text
  (a well-formed `<tool_call>` block, a malformed one) through the whole server, streamed and not.
Streams are assembled by the openai client's own `ChatCompletionStreamState`.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import qwen2_pure
from qwen2_pure.serve import constrained, tools
from qwen2_pure.serve.constrained import RequestFieldError
from qwen2_pure.serve.tools import ToolCallStream, chat_message, parse_tool_calls, parse_tools

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from openai.lib.streaming.chat import ChatCompletionStreamState  # noqa: E402

from qwen2_pure.serve.app import create_app  # noqa: E402
from test_serve import LiveServer  # noqa: E402

# ---- tools and schemas ------------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ACCOUNT = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                              "admin": {"type": "boolean"}},
             "required": ["id", "admin"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["user", "tags"], "additionalProperties": False}
MEASURE = {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                            "n": {"type": "integer"}},
           "required": ["x", "n"], "additionalProperties": False}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool(name, parameters=None, description="a function"):
    fn = {"name": name, "description": description}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


TOOLS = [tool("get_weather", WEATHER), tool("update_account", ACCOUNT), tool("measure", MEASURE), tool("ping")]
PARAMETERS = {"get_weather": WEATHER, "update_account": ACCOUNT, "measure": MEASURE, "ping": NO_PARAMETERS}

# response_format json_schema: enums, nested objects, arrays, required/optional, numbers, a top-level array
SCHEMAS = {
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"enum": [1, 2, 3]}},
              "required": ["color", "size"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object", "properties": {"zip": {"type": "integer", "minimum": 1000,
                                                                 "maximum": 99999},
                                                         "country": {"enum": ["FR", "DE", "JP"]}},
                        "required": ["zip", "country"], "additionalProperties": False}},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 100},
                                         "ok": {"type": "boolean"}},
        "required": ["id", "ok"], "additionalProperties": False}, "minItems": 1, "maxItems": 4}},
        "required": ["items"], "additionalProperties": False},
    "required": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                  "nick": {"type": "string", "maxLength": 5},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                 "required": ["name", "age"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 50},
                                                 "ratio": {"type": "number"}},
                "required": ["price", "qty", "ratio"], "additionalProperties": False},
    "array root": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                   "minItems": 2, "maxItems": 5},
}
# free strings and free objects: only the `noise` model ends them
OPEN_SCHEMAS = {
    "json_object": None,
    "free strings": {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
                     "required": ["title", "body"]},
    "anything": {"type": "object", "properties": {"meta": {"type": "object"}, "list": {"type": "array"}},
                 "required": ["meta", "list"]},
}


# ---- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(demo_tokenizer_dir, tmp_path_factory):
    """tests/test_serve.py's tiny chat checkpoint with a context of 2048 (a prompt listing tools is long)."""
    from hf_utils import make_chat_checkpoint
    path = make_chat_checkpoint(tmp_path_factory.mktemp("tools_model"), demo_tokenizer_dir, 16)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048  # RoPE has no table to outgrow
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return qwen2_pure.load_model(model_dir), qwen2_pure.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    # no prompt cache: a scripted answer starts at each prefill (a reused prefix would shorten it to one token)
    s = LiveServer(create_app(model, tok, slots=4, max_seq_len=1024, prompt_cache_mb=0))
    yield s
    s.close()


@pytest.fixture
def client(server):
    return server.client()


class _Logits:
    """The model's forward runs as usual (its cache stays right), but its logits are replaced."""

    def __init__(self, model, monkeypatch, make):
        real = model.forward

        def forward(ids, *args, **kwargs):
            out = real(ids, *args, **kwargs)
            return make(out, ids.shape[1] > 1)  # (B, T, V) logits, and whether this was a prefill

        monkeypatch.setattr(model, "forward", forward)


@pytest.fixture
def noise(loaded, monkeypatch):
    """Logits of seeded noise, closing tokens favoured: strings and containers end after a few tokens."""
    model, tok = loaded
    closers = sorted({i for s in ('"', "}", "]", '",', '"}', '"]', "},", "}}", "]}", "],", '"}}', "}]")
                      for i in [tok.token_to_id(s.replace(" ", "Ġ"))] if i is not None})
    g = torch.Generator().manual_seed(0)

    def make(out, prefill):
        logits = torch.randn(out.shape, generator=g)
        logits[..., closers] += 12.0
        return logits.to(out.dtype)

    _Logits(model, monkeypatch, make)
    return closers


@pytest.fixture
def scripted(loaded, monkeypatch):
    """`scripted(text)`: the model answers `text` then <|im_end|> (one request at a time)."""
    model, tok = loaded
    state = {"tokens": [], "i": 0}

    def make(out, prefill):
        if prefill:
            state["i"] = 0
        tokens = state["tokens"]
        logits = torch.full(out.shape, -30.0, dtype=out.dtype)
        logits[..., tokens[min(state["i"], len(tokens) - 1)]] = 30.0
        state["i"] += 1
        return logits

    _Logits(model, monkeypatch, make)

    def script(text):
        state["tokens"] = tok.encode(text) + [tok.token_to_id("<|im_end|>")]
    return script


# ---- helpers ----------------------------------------------------------------------------------------------------

def ask(client, stream, **kw):
    """(message, finish_reason) of one chat request, streamed chunks assembled by the openai client."""
    kw.setdefault("messages", [{"role": "user", "content": "What is the weather in Paris?"}])
    kw.setdefault("model", "qwen2")
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message, r.choices[0].finish_reason
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(stream=True, **kw):
        state.handle_chunk(chunk)
    try:
        r = state.get_final_completion()
    except openai.LengthFinishReasonError:  # the helper refuses a cut answer; its snapshot holds it all the same
        r = state.current_completion_snapshot
    return r.choices[0].message, r.choices[0].finish_reason


def calls_of(message) -> list:
    return [(c.function.name, json.loads(c.function.arguments), c.id, c.type) for c in message.tool_calls or []]


def check_calls(message, finish_reason, allowed):
    calls = calls_of(message)
    assert calls and finish_reason == "tool_calls", (message, finish_reason)
    for name, args, call_id, kind in calls:
        assert name in allowed and kind == "function" and call_id.startswith("call_")
        jsonschema.validate(args, PARAMETERS[name])
    return calls


def sample(seed):
    return {"temperature": 1.0, "seed": seed}


# ---- parsing the model's text (no server) -------------------------------------------------------------------------

def test_parse_tool_calls():
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    assert parse_tool_calls("Hello") == ("Hello", [])
    assert parse_tool_calls(block) == (None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')])
    two = "Let me check.\n\n" + block + "\n" + block.replace("Paris", "東京")
    content, calls = parse_tool_calls(two)
    assert content == "Let me check." and [json.loads(a)["city"] for _, a in calls] == ["Paris", "東京"]
    assert calls[1][1] == '{"city": "東京", "unit": "celsius"}'  # ensure_ascii=False, as vLLM
    assert parse_tool_calls(block[:-len("</tool_call>")]) == parse_tool_calls(block)  # unclosed, JSON complete
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>')[1] == \
        [("f", '{"a": 1}')]  # arguments already a JSON string
    assert parse_tool_calls('<tool_call>\n{"name": "f"}\n</tool_call>')[1] == [("f", "{}")]
    for bad in ['<tool_call>\n{"name": "f", "arguments": {"a": </tool_call>', "<tool_call>\nnot json\n</tool_call>",
                '<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n["f"]\n</tool_call>',
                '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', block + "\n<tool_call>\n{oops"]:
        assert parse_tool_calls("Hi " + bad) == ("Hi " + bad, []), bad  # malformed: all of it is content


def test_chat_message_and_finish_reason():
    text = '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    spec = tools.ToolSpec(tools=[tool("ping")])
    message, reason = chat_message(text, "stop", spec)
    assert message["content"] is None and reason == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "ping", "arguments": "{}"}
    assert chat_message(text, "length", spec)[1] == "length"
    # a forced answer cut short by max_tokens: the complete calls stand (auto: all of it is content)
    cut = text + "\n" + text[:30]
    forced = tools.ToolSpec(tools=[tool("ping")], choice="required")
    message, reason = chat_message(cut, "length", forced)
    assert reason == "length" and len(message["tool_calls"]) == 1
    assert chat_message(cut, "length", spec) == ({"role": "assistant", "content": cut}, "length")
    assert chat_message(text, "stop", None) == ({"role": "assistant", "content": text}, "stop")
    none = tools.ToolSpec(tools=[tool("ping")], choice="none")
    assert chat_message(text, "stop", none) == ({"role": "assistant", "content": text}, "stop")


def assemble(deltas) -> dict:
    """Deltas merged the way the openai client merges them (content appended; tool calls by index)."""
    out = {"content": "", "calls": {}}
    for d in deltas:
        out["content"] += d.get("content") or ""
        for c in d.get("tool_calls", []):
            call = out["calls"].setdefault(c["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = c.get("id") or call["id"]
            call["name"] += c.get("function", {}).get("name") or ""
            call["arguments"] += c.get("function", {}).get("arguments") or ""
    return out


STREAM_TEXTS = [
    "Just text, no call. <tool_ is not a tag",
    "Trailing space before a call   \n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": {\"y\": [1, 2]}}}\n"
    "</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>",
    '<tool_call>\n{"name": "c", "arguments": {"s": "} }"}}\n</tool_call>',
    '<tool_call>\n{"arguments": {"k": 1}, "name": "late_name"}\n</tool_call>',  # name after arguments
    '<tool_call>\n{"name": "s", "arguments": "{\\"k\\": 1}"}\n</tool_call>',  # arguments as a string
    "Before <tool_call>\n{\"name\": \"broken\", \"arguments\": {\"k\": </tool_call> after",
    "<tool_call>\ngarbage\n</tool_call>",
    "ends with a partial tag <tool_c",
]


def streamed(text, incremental, cuts, rng):
    """The assembled deltas and finish_reason of `text` pushed in pieces ("chars", "random" or "whole")."""
    stream, deltas, i = ToolCallStream(incremental=incremental), [], 0
    while i < len(text):
        n = 1 if cuts == "chars" else len(text) if cuts == "whole" else rng.randint(1, 12)
        deltas += stream.push(text[i:i + n])
        i += n
    last, reason = stream.finish("stop")
    for d in deltas + last:  # a header comes alone: index, id, type, name (and the arguments so far)
        for c in d.get("tool_calls", []):
            assert "index" in c and ("id" not in c or (c["type"] == "function" and "name" in c["function"]))
    return assemble(deltas + last), reason


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("incremental", [False, True], ids=["auto", "forced"])
def test_stream_equals_non_stream(text, incremental):
    """However the text is cut into pieces, the assembled deltas say what the non-streamed message says (in the
    forced choices' incremental mode, for the texts a grammar lets through: well-formed calls or none)."""
    rng = random.Random(0)
    expected, reason = chat_message(text, "stop", tools.ToolSpec(tools=[]))
    if incremental and "<tool_call>" in text and not expected.get("tool_calls"):
        pytest.skip("a forced answer is always well formed")
    for cuts in ["chars", "random", "whole"]:
        got, got_reason = streamed(text, incremental, cuts, rng)
        assert got_reason == reason
        assert (got["content"] or None) == (expected["content"] or None)
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                 for c in expected.get("tool_calls", [])]
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(got["calls"].items())] == calls
        assert all(c["id"] for c in got["calls"].values())


def test_stream_sends_calls_as_they_complete():
    """auto: a call goes out when its block closes, never half; forced: the header as soon as the name is
    complete, then the arguments piece by piece. A malformed block after sent calls becomes content."""
    head = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    auto, forced = ToolCallStream(), ToolCallStream(incremental=True)
    assert auto.push(head) == []
    assert forced.push(head) == [
        {"tool_calls": [{"index": 0, "id": forced.calls[0].id, "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]}]
    tail = 'is"}}\n</tool_call>'
    assert forced.push(tail) == [{"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}]
    done = auto.push(tail)
    assert [d["tool_calls"][0]["function"] for d in done] == [{"name": "get_weather", "arguments": ""},
                                                             {"arguments": '{"city": "Paris"}'}]
    bad = "\n<tool_call>\n{oops}\n</tool_call>"
    assert auto.push(bad) == [] and auto.finish("stop") == ([{"content": bad[1:]}], "tool_calls")


def test_parse_tools_errors():
    assert parse_tools({}) is None and parse_tools({"tool_choice": "auto", "tools": []}) is None
    spec = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "measure"}}})
    assert spec.choice == "named" and spec.forced and [f["name"] for f in spec.functions()] == ["measure"]
    assert parse_tools({"tools": TOOLS}).choice == "auto" and not parse_tools({"tools": TOOLS}).forced
    for body, param in [({"tools": "x"}, "tools"), ({"tools": [{"type": "function"}]}, "tools"),
                        ({"tools": [tool("")]}, "tools"), ({"tools": [tool("a"), tool("a")]}, "tools"),
                        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
                        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls")]:
        with pytest.raises(RequestFieldError) as e:
            parse_tools(body)
        assert e.value.param == param, body


def test_forced_grammar_shape(loaded):
    _, tok = loaded
    spec = parse_tools({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    lark = tools.tool_call_lark(spec, tok)
    assert lark.startswith("start: calls\ncalls: call\n") and "<[151657]>" in lark and "<[151658]>" in lark
    assert "call)*" in tools.tool_call_lark(parse_tools({"tools": TOOLS, "tool_choice": "required"}), tok)
    # $defs of the parameters move to the root, where "#/$defs/..." resolves
    with_defs = tool("f", {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
                           "$defs": {"P": {"enum": ["x"]}}, "required": ["p"]})
    schema = tools.call_schema(parse_tools({"tools": [with_defs], "tool_choice": "required"}))
    assert schema["$defs"] == {"P": {"enum": ["x"]}} and "$defs" not in schema["properties"]["arguments"]
    assert tools.answer_grammar(parse_tools({"tools": [with_defs], "tool_choice": "required"}), None, tok)


def test_grammar_masks_padding_rows_and_ends_with_stop(loaded):
    """Rows beyond the tokenizer (151,665..151,935) are never allowed; once the grammar is complete only the
    stop tokens are."""
    _, tok = loaded
    vocab = constrained.grammar_vocab(tok, 151936, tok.stop_token_ids)
    p = constrained.GrammarProcessor(vocab, constrained.json_grammar({"enum": ["yes", "no"]}))
    assert p(tok.encode(""), torch.zeros(151936))[tok.vocab_size:].eq(float("-inf")).all()
    out = p(tok.encode('"yes"'), torch.zeros(151936))
    assert set(torch.isfinite(out).nonzero().flatten().tolist()) == set(tok.stop_token_ids)


def test_history_renders_like_transformers(loaded, demo_tokenizer_dir):
    """An OpenAI-style history (assistant tool_calls with JSON-string arguments, role tool) renders as
    transformers' apply_chat_template renders Qwen's own form of it (arguments as objects)."""
    transformers = pytest.importorskip("transformers")
    from qwen2_pure.serve import protocol
    _, tok = loaded
    hf = transformers.AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))
    history = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "東京", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temperature": 25}'},
        {"role": "assistant", "content": "Paris 21, Tokyo 25.", "tool_calls": []},
        {"role": "user", "content": "Thanks. And Berlin?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
        {"role": "tool", "content": "pong"},
    ]
    qwen_form = json.loads(json.dumps(history))  # Qwen's docs: arguments as objects, the call's function only
    for m in qwen_form:
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                                                  "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
    info = protocol.ServerInfo(model_name="m", tokenizer=tok, vocab_size=151936, max_seq_len=4096)
    for tool_list in (TOOLS[:2], None):
        body = {"messages": history, **({"tools": tool_list} if tool_list else {})}
        ours = tok.decode(protocol.chat_prompt_ids(body, info))
        theirs = hf.apply_chat_template(qwen_form, tools=tool_list, tokenize=False, add_generation_prompt=True)
        assert ours == theirs
    assert "<tool_response>\npong\n</tool_response>" in ours and '"arguments": {"city": "東京"' in ours


# ---- the server: forced tool calls --------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_required_always_gives_valid_calls(client, stream):
    names = set(PARAMETERS)
    seen = set()
    for seed in range(4):
        message, reason = ask(client, stream, tools=TOOLS, tool_choice="required", parallel_tool_calls=seed % 2 == 0,
                              max_tokens=400, **sample(seed))
        calls = check_calls(message, reason, names)
        assert message.content in (None, "")
        if seed % 2:
            assert len(calls) == 1
        seen |= {name for name, *_ in calls}
    assert len(seen) >= 2, seen  # the choice between functions is the model's


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", ["get_weather", "update_account", "measure", "ping"])
def test_named_function_always_called(client, stream, name):
    for seed in range(2):
        message, reason = ask(client, stream, tools=TOOLS, max_tokens=300, **sample(seed),
                              tool_choice={"type": "function", "function": {"name": name}})
        [(called, args, _, _)] = check_calls(message, reason, {name})


def test_forced_call_with_n_and_greedy(client):
    r = client.chat.completions.create(model="qwen2", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, n=2,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=300, **sample(3))
    assert len(r.choices) == 2
    for choice in r.choices:
        check_calls(choice.message, choice.finish_reason, {"get_weather"})
    # greedy repeats itself: with parallel calls allowed it would call again and again until max_tokens
    greedy = ask(client, False, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                 temperature=0)
    check_calls(*greedy, set(PARAMETERS))


# ---- the server: auto ---------------------------------------------------------------------------------------------

GOOD = ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_auto_parses_the_models_blocks(client, scripted, stream):
    scripted(GOOD)
    message, reason = ask(client, stream, tools=TOOLS, max_tokens=100)
    assert reason == "tool_calls" and message.content == "I will check both."
    assert [(n, a) for n, a, *_ in calls_of(message)] == [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                                         ("ping", {})]
    assert len({c.id for c in message.tool_calls}) == 2
    # tool_choice none: the same text is plain content
    message, reason = ask(client, stream, tools=TOOLS, tool_choice="none", max_tokens=100)
    assert message.content == GOOD and not message.tool_calls and reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("text", [
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": ',  # cut short
    '<tool_call>\n{name: get_weather}\n</tool_call>',  # not JSON
    '<tool_call>\n<tool_call>\n</tool_call>',
])
def test_auto_malformed_is_plain_content(client, scripted, stream, text):
    scripted(text)
    message, reason = ask(client, stream, tools=TOOLS, max_tokens=100)
    assert reason == "stop" and message.content == text and not message.tool_calls


def test_auto_gibberish_never_fails(client):
    for seed in range(3):
        for stream in (False, True):
            message, reason = ask(client, stream, tools=TOOLS, max_tokens=24, **sample(seed))
            assert reason in ("stop", "length", "tool_calls")


# ---- the server: response_format ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("label", list(SCHEMAS))
def test_json_schema_always_valid(client, stream, label):
    schema = SCHEMAS[label]
    for seed in range(2):
        message, reason = ask(client, stream, max_tokens=500, **sample(seed), response_format={
            "type": "json_schema", "json_schema": {"name": label.replace(" ", "_"), "schema": schema}})
        assert reason == "stop", message
        jsonschema.validate(json.loads(message.content), schema)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("label", list(OPEN_SCHEMAS))
def test_open_json_always_valid(client, noise, stream, label):
    schema = OPEN_SCHEMAS[label]
    fmt = {"type": "json_object"} if schema is None else {"type": "json_schema",
                                                          "json_schema": {"name": "x", "schema": schema}}
    for seed in range(2):
        message, reason = ask(client, stream, max_tokens=500, response_format=fmt, **sample(seed))
        assert reason == "stop", message
        value = json.loads(message.content)
        jsonschema.validate(value, schema or {"type": "object"})


def test_json_with_auto_tools_is_json_or_calls(client, scripted):
    fmt = {"type": "json_schema", "json_schema": {"name": "e", "schema": SCHEMAS["enums"]}}
    scripted(GOOD.split("I will check both.\n")[1])
    message, reason = ask(client, False, tools=TOOLS, response_format=fmt, max_tokens=100)
    assert reason == "tool_calls" and len(message.tool_calls) == 2
    scripted('{"color": "red", "size": 2}')
    message, reason = ask(client, False, tools=TOOLS, response_format=fmt, max_tokens=100)
    assert reason == "stop" and json.loads(message.content) == {"color": "red", "size": 2}


def test_constrained_completions_endpoint(client):
    r = client.completions.create(model="qwen2", prompt="A JSON answer:", max_tokens=200, temperature=1.0, seed=1,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "n", "schema": SCHEMAS["numbers"]}}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["numbers"])


# ---- the server: errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strange"}}}],
      "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"ignore_eos": True}}, "ignore_eos"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls"),
])
def test_bad_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, False, max_tokens=5, **kw)
    assert e.value.body["param"] == param, e.value.body


def test_tools_on_completions_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qwen2", prompt="x", max_tokens=5, extra_body={"tools": TOOLS})
    assert e.value.body["param"] == "tools"


def test_streamed_arguments_start_at_the_object_whatever_the_split():
    """The header can match before the space after `"arguments":` arrives; the arguments still begin at "{"."""
    from qwen2_pure.serve.tools import ToolCallStream
    pieces = ['<tool_call>\n{"name": "get_weather", "arguments":', ' {"city": ', '"Paris"}}', '\n</tool_call>']
    stream = ToolCallStream(incremental=True)
    deltas = [d for p in pieces for d in stream.push(p)]
    deltas += stream.finish("stop")[0]
    args = "".join(c["function"].get("arguments", "") for d in deltas for c in d.get("tool_calls", []))
    assert args == '{"city": "Paris"}'
