"""Tokenizer layer: ids, decoding, chat templates and streaming against transformers, on the real Qwen2.5
tokenizer rebuilt from the demo GGUF; plus error handling on small hand-made files.

The demo-based tests skip when the demo packages are not installed; transformers-based comparisons skip
when transformers is missing.
"""

from __future__ import annotations

import json
import unicodedata

import pytest

from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.tokenizer import TextStream, Tokenizer

# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tok(demo_tokenizer_dir):
    return Tokenizer.from_dir(demo_tokenizer_dir)


@pytest.fixture(scope="session")
def hf(demo_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))


@pytest.fixture(scope="session")
def demo_files(demo_tokenizer_dir):
    """(tokenizer.json text, tokenizer_config, generation_config) as written by the fixture."""
    return ((demo_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"),
            json.loads((demo_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8")),
            json.loads((demo_tokenizer_dir / "generation_config.json").read_text(encoding="utf-8")))


# A BPE tokenizer.json small enough to write by hand, for tests that only need *a* tokenizer.
TINY_TOKENIZER_JSON = json.dumps({
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": 3, "content": "<eos>", "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True}],
    "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
})

# ---------------------------------------------------------------------------------------------------------
# Encoding and decoding

CORPUS = {
    "english": "Hello, world! The quick brown fox jumps over the lazy dog. I'm sure you'RE right, they'll see.",
    "chinese": "中文测试：今天天气很好，我们去公园散步吧。",
    "japanese": "こんにちは、世界。カタカナとひらがなと漢字。",
    "korean": "안녕하세요, 세계! 한국어 문장입니다.",
    "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "emoji_zwj": "family 👨‍👩‍👧‍👦, thumbs 👍🏽👍🏿, flag 🏳️‍🌈, 🧑🏾‍💻 codes",
    "code_tabs": "def f(x):\n\tif x  >   1:\n\t\treturn x ** 2   \n\n\n    # done\n}\t\t{",
    "numbers": "12345 3.14159 -0.5e-10 1,000,000 0x1F ٣٤٥ ²",
    "crlf": "line one\r\nline two\r\n\r\nthree\r",
    "special_in_text": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><tool_call>{}</tool_call><|fim_prefix|>x",
    "nfd": unicodedata.normalize("NFD", "café naïve Ångström 한국어 ếồ"),
    "empty": "",
    "whitespace_only": " \t \n  \n\n   ",
    "long_repeat": "ab" * 3000 + " the the the" * 300,
    "mixed": "Mixing English, 中文, русский и العربية in one line — with “quotes” and…ellipsis",
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_encode_matches_transformers(tok, hf, name):
    text = CORPUS[name]
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"] == hf.encode(text)


def test_known_ids(tok):
    # Fixed points of the Qwen2 vocabulary (no BOS is prepended).
    assert tok.encode("\n") == [198]
    assert tok.encode("system") == [8948]
    assert tok.encode("user") == [872]
    assert tok.encode("assistant") == [77091]
    assert tok.encode("<|im_start|>user\n<|im_end|>") == [151644, 872, 198, 151645]
    assert tok.encode("") == []
    # Digits are split one per token.
    assert len(tok.encode("12345")) == 5


def test_nfc_normalization(tok):
    # The official tokenizer.json normalizes to NFC (llama.cpp does not): NFD input gives the NFC ids.
    nfc = "café naïve Ångström 한국어"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    assert tok.encode(nfd) == tok.encode(nfc)


def test_encode_batch(tok):
    texts = [CORPUS["english"], CORPUS["chinese"], ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("name", list(CORPUS))
def test_decode_round_trip(tok, hf, name):
    text = CORPUS[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><tool_call>x</tool_call><|endoftext|>")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><tool_call>x</tool_call><|endoftext|>"
    # <tool_call> is an added token but not a special one: it survives skip_special_tokens.
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi<tool_call>x</tool_call>"
    # Ids past the tokenizer (embedding padding rows) decode to nothing; tensors are accepted.
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor([40, 151900])) == tok.decode([40])


def test_properties(tok, hf):
    assert tok.eos_token_id == 151645 == hf.eos_token_id
    assert tok.pad_token_id == 151643 == hf.pad_token_id
    assert tok.bos_token_id is None
    assert tok.stop_token_ids == [151645, 151643]
    assert tok.vocab_size == len(hf) == 151665
    assert tok.special_token_ids == set(hf.all_special_ids)
    assert {151643, 151644, 151645} <= tok.special_token_ids
    assert 151657 not in tok.special_token_ids  # <tool_call>
    assert tok.generation_config == {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                     "pad_token_id": 151643}
    assert tok.chat_template.startswith("{%- if tools %}")


def test_stop_token_ids_fallbacks():
    cfg = {"eos_token": "<eos>"}
    assert Tokenizer(TINY_TOKENIZER_JSON, cfg).stop_token_ids == [3]                     # no generation config
    assert Tokenizer(TINY_TOKENIZER_JSON, cfg, {"eos_token_id": 7}).stop_token_ids == [7]          # an int
    assert Tokenizer(TINY_TOKENIZER_JSON, cfg, {"eos_token_id": [3, 1]}).stop_token_ids == [3, 1]  # a list
    old_style = {"eos_token": {"content": "<eos>", "__type": "AddedToken"}}
    assert Tokenizer(TINY_TOKENIZER_JSON, old_style).eos_token_id == 3
    assert Tokenizer(TINY_TOKENIZER_JSON, {}).stop_token_ids == []


# ---------------------------------------------------------------------------------------------------------
# Files rebuilt from the GGUF


def test_gguf_tokenizer_files_match_official_layout(demo_files):
    text, cfg, gen = demo_files
    tj = json.loads(text)
    assert tj["normalizer"] == {"type": "NFC"}
    split, byte_level = tj["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert split["pattern"]["Regex"].startswith(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|")
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                          "use_regex": False}
    assert tj["decoder"]["type"] == "ByteLevel"
    assert tj["post_processor"]["type"] == "ByteLevel" and tj["post_processor"]["trim_offsets"] is False
    model = tj["model"]
    assert model["type"] == "BPE" and model["unk_token"] is None and model["byte_fallback"] is False
    assert len(model["vocab"]) == 151643 and len(model["merges"]) == 151387
    added = {t["id"]: t for t in tj["added_tokens"]}
    assert len(added) == 22 and min(added) == 151643 and max(added) == 151664  # no [PAD...] rows
    assert added[151643]["content"] == "<|endoftext|>" and added[151643]["special"] is True
    assert added[151657]["content"] == "<tool_call>" and added[151657]["special"] is False
    assert all(t["normalized"] is False for t in added.values())

    assert cfg["bos_token"] is None and cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["model_max_length"] == 32768
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["errors"] == "replace"
    assert cfg["clean_up_tokenization_spaces"] is False and cfg["split_special_tokens"] is False
    assert cfg["add_prefix_space"] is False and cfg["add_bos_token"] is False
    assert cfg["additional_special_tokens"][:2] == ["<|im_start|>", "<|im_end|>"]
    assert "<|endoftext|>" not in cfg["additional_special_tokens"]
    assert cfg["added_tokens_decoder"]["151658"] == {"content": "</tool_call>", "lstrip": False,
                                                     "normalized": False, "rstrip": False,
                                                     "single_word": False, "special": False}
    assert "You are Qwen, created by Alibaba Cloud." in cfg["chat_template"]
    # Only ids: the GGUF carries no sampling settings, so none are invented.
    assert gen == {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


def _write_gguf(path, **kv):
    """A GGUF with no tensors and the given tokenizer metadata (None values are left out)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(64)
    setters = {"model": w.add_tokenizer_model, "pre": w.add_tokenizer_pre, "tokens": w.add_token_list,
               "types": w.add_token_types, "merges": w.add_token_merges, "eos": w.add_eos_token_id,
               "pad": w.add_pad_token_id, "bos": w.add_bos_token_id, "template": w.add_chat_template}
    for key, value in kv.items():
        if value is not None:
            setters[key](value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


# Byte-level spellings: "Ġ" is the space byte. Types: 1 normal, 3 control, 4 user defined, 5 unused.
_TINY = dict(model="gpt2", pre="qwen2",
             tokens=["a", "b", "Ġ", "ab", "Ġab", "<|endoftext|>", "<|im_end|>", "<think>", "[PAD8]", "[PAD9]"],
             types=[1, 1, 1, 1, 1, 3, 3, 4, 5, 5], merges=["a b", "Ġ ab"], eos=6, pad=5, bos=5,
             template="{{ messages[0]['content'] }}")


def test_gguf_tokenizer_files_tiny(tmp_path):
    from qwen2_pure.loading.gguf_tokenizer import gguf_tokenizer_files
    text, cfg, gen = gguf_tokenizer_files(_write_gguf(tmp_path / "t.gguf", **_TINY))
    tok = Tokenizer(text, cfg, gen)
    assert tok.encode("ab ab<think><|im_end|>") == [3, 4, 7, 6]
    assert tok.vocab_size == 8  # the two unused [PAD] rows are not tokens
    assert tok.special_token_ids == {5, 6}
    assert tok.decode([3, 7, 6, 9], skip_special_tokens=True) == "ab<think>"
    assert tok.stop_token_ids == [6, 5]
    assert cfg["additional_special_tokens"] == ["<|im_end|>"] and cfg["model_max_length"] == 64
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    # eos == pad: a single stop id, as in base-model generation configs
    _, _, gen = gguf_tokenizer_files(_write_gguf(tmp_path / "u.gguf", **dict(_TINY, eos=5)))
    assert gen["eos_token_id"] == 5


@pytest.mark.parametrize("change, message", [
    (dict(model=None), "tokenizer.ggml.model"),
    (dict(tokens=None, types=None, merges=None), "tokenizer.ggml.tokens"),
    (dict(merges=None), "tokenizer.ggml.merges"),
    (dict(eos=None), "tokenizer.ggml.eos_token_id"),
    (dict(model="llama"), "'llama'"),
    (dict(pre="llama-bpe"), "'llama-bpe'"),
    (dict(pad=99), "padding_token_id = 99"),
])
def test_gguf_tokenizer_errors(tmp_path, change, message):
    from qwen2_pure.loading.gguf_tokenizer import gguf_tokenizer_files
    reader = _write_gguf(tmp_path / "bad.gguf", **dict(_TINY, **change))
    with pytest.raises(Qwen2PureError) as e:
        gguf_tokenizer_files(reader)
    assert message in str(e.value) and "bad.gguf" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Chat template

_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <b>now</b> & 'later' in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}]

CHATS = {
    "no_system": ([{"role": "user", "content": "Hi"}], None),
    "system": ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], None),
    "multi_turn": ([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "東京?"}], None),
    "tools": ([{"role": "user", "content": "Weather in Paris?"}], _TOOLS),
    "tools_with_system": ([{"role": "system", "content": "You help."},
                           {"role": "user", "content": "Weather in Paris?"}], _TOOLS),
    "tool_calls_and_results": ([
        {"role": "user", "content": "Weather in Paris and 東京?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "22C"},
        {"role": "tool", "tool_call_id": "c2", "content": "18C"},
        {"role": "assistant", "content": "Paris 22C, Tokyo 18C."},
        {"role": "user", "content": "thanks"}], _TOOLS),
    "tool_call_with_content": ([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}]},
        {"role": "tool", "content": "ok"}], None),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_matches_transformers(tok, hf, name, add_generation_prompt):
    messages, tools = CHATS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    tokenize=False)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_default_system_and_tools(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    messages, tools = CHATS["tool_calls_and_results"]
    text = tok.apply_chat_template(messages, tools=tools)
    # tojson: no HTML escaping, no ASCII escaping, key order kept
    assert '"description": "Weather <b>now</b> & \'later\' in a city"' in text
    assert '{"name": "get_weather", "arguments": {"city": "東京"}}' in text
    assert "<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\n18C\n</tool_response>" \
           "<|im_end|>" in text


# Exercises what the Qwen template does not: None-valued keys dropped, special-token variables, extra
# variables, loop controls, namespace, `{% generation %}`, tojson options.
_FEATURE_TEMPLATE = """
{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'stop' %}{% break %}{% endif -%}
{%- if m.role == 'skip' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
[{{ m.role }}|{{ m.content is defined }}|{{ m.name is defined }}]{% generation %}{{ m.content | default('-') }}{% endgeneration %}
{% endfor -%}
{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ ns.n }}|{{ add_generation_prompt }}
{{ tools | tojson }}
{{ {'b': '<&>', 'a': 'é'} | tojson(indent=2, sort_keys=true) }}
{{ extra_var }}
"""


def test_chat_template_features_match_transformers(demo_files, hf):
    text, cfg, gen = demo_files
    tok = Tokenizer(text, dict(cfg, chat_template=_FEATURE_TEMPLATE), gen)
    messages = [{"role": "user", "content": "a", "name": None}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": None}, {"role": "stop", "content": "y"},
                {"role": "user", "content": "never"}]
    ours = tok.apply_chat_template(messages, tools=_TOOLS, extra_var="X<>")
    theirs = hf.apply_chat_template(messages, tools=_TOOLS, chat_template=_FEATURE_TEMPLATE,
                                    add_generation_prompt=True, tokenize=False, extra_var="X<>")
    assert ours == theirs
    assert "[user|True|False]a[assistant|False|False]-<|im_end|>|<|endoftext|>|False|2|True" in ours
    # the caller's messages are not modified
    assert messages[2] == {"role": "assistant", "content": None}


def test_chat_template_errors():
    tok = Tokenizer(TINY_TOKENIZER_JSON, {"eos_token": "<eos>"}, name="base-model")
    assert tok.chat_template is None
    with pytest.raises(Qwen2PureError, match="base-model: no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    raising = Tokenizer(TINY_TOKENIZER_JSON, {"chat_template": "{{ raise_exception('roles must alternate') }}"})
    with pytest.raises(Qwen2PureError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer(TINY_TOKENIZER_JSON, {"chat_template": "{% for m in messages %}"})
    with pytest.raises(Qwen2PureError, match="syntax error"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(Qwen2PureError, match="non-empty list"):
        raising.apply_chat_template([])
    # The sandbox: templates cannot reach Python internals.
    escape = Tokenizer(TINY_TOKENIZER_JSON, {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(Qwen2PureError):
        escape.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_from_jinja_file_and_named_list(tmp_path):
    (tmp_path / "tokenizer.json").write_text(TINY_TOKENIZER_JSON)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}{{ eos_token }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == "1<eos>"
    assert tok.stop_token_ids == [3] and tok.encode("abab<eos>") == [2, 2, 3]
    # Older tokenizer_config.json files: a list of named templates ("tool_use" is picked when tools are given)
    named = Tokenizer(TINY_TOKENIZER_JSON, {"chat_template": [{"name": "default", "template": "D"},
                                                              {"name": "tool_use", "template": "T"}]})
    assert named.apply_chat_template([{"role": "user", "content": ""}]) == "D"
    assert named.apply_chat_template([{"role": "user", "content": ""}], tools=[]) == "T"


# ---------------------------------------------------------------------------------------------------------
# Streaming


def _stream(tok, ids, **kw):
    stream = TextStream(tok, **kw)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    return pieces, stream


def _truncated(text, stops):
    cut = [text.find(s) for s in stops if s in text]
    return text[:min(cut)] if cut else text


STREAM_TEXT = "東京の天気は晴れ☀️です。Family: 👨‍👩‍👧‍👦 and 👍🏽! 한국어도 OK. Ünïcödé ends 🎉"


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode_with_split_characters(tok, skip):
    ids = tok.encode("<|im_start|>assistant\n" + STREAM_TEXT + "<|im_end|>")
    # The test is only meaningful if some characters are split over several tokens:
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, stream = _stream(tok, ids, skip_special_tokens=skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert not stream.stopped
    assert sum(1 for p in pieces if p) > 10  # and it does stream, not just flush at the end


def test_stream_window_stays_small(tok):
    """Each step decodes a short window of recent ids, not the whole history."""
    class Recording:
        def __init__(self):
            self.lengths = []

        def decode(self, ids, skip_special_tokens=False):
            ids = list(ids)
            self.lengths.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(STREAM_TEXT * 40)
    recorder = Recording()
    pieces, _ = _stream(recorder, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 1000 and max(recorder.lengths) <= 8


def test_stream_incomplete_character_at_the_end(tok):
    ids = tok.encode("ok 🎉")
    cut = ids[:-1]  # the emoji's last byte(s) missing
    assert tok.decode(cut).endswith("\ufffd")
    pieces, _ = _stream(tok, cut)
    assert "\ufffd" not in "".join(pieces[:-1])  # held back while streaming...
    assert "".join(pieces) == tok.decode(cut)   # ...and flushed by finish(), like decode


@pytest.mark.parametrize("text, stops", [
    ("The answer is 42. Done!", ["s 42."]),                     # spans " is", " ", "4", "2", "."
    ("東京都の天気は晴れです", ["京都の"]),                       # spans multi-byte tokens
    ("emoji 👨‍👩‍👧‍👦 then STOP", ["👩‍👧"]),                       # stop inside a ZWJ sequence
    ("alpha beta gamma delta", ["mma del", "beta g", "zzz"]),  # earliest occurrence wins
    ("Hello world, all good", ["world!"]),                      # a partial match is released again
    ("tail ends with STO", ["STOP"]),                           # partial match at the end flushed by finish
])
def test_stream_stop_strings(tok, text, stops):
    ids = tok.encode(text)
    for s in stops:
        assert not any(s in tok.decode([i]) for i in ids), "stop string must span several tokens"
    pieces, stream = _stream(tok, ids, stop=stops)
    full = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == _truncated(full, stops)
    hit = [s for s in stops if s in full]
    assert stream.stopped == bool(hit)
    if hit:
        assert stream.stop_string == min(hit, key=full.find)
        assert pieces[-1] == ""  # nothing more after the stop


def test_stream_earliest_stop_wins(tok):
    # Both stop strings complete on the token " gamma": the one that starts first decides the cut.
    pieces, stream = _stream(tok, tok.encode("alpha beta gamma delta"), stop=["gamma", "beta gamma"])
    assert "".join(pieces) == "alpha " and stream.stop_string == "beta gamma"


def test_stream_stop_at_very_start(tok):
    ids = tok.encode("STOP and then more text")
    stream = TextStream(tok, stop=["ST"])
    assert stream.push(ids[0]) == ""
    assert stream.stopped and stream.stop_string == "ST"
    assert [stream.push(i) for i in ids[1:]] == [""] * (len(ids) - 1)
    assert stream.finish() == ""
    # a special token as a stop string, visible only without skip_special_tokens
    stream = TextStream(tok, skip_special_tokens=False, stop=["<|im_end|>"])
    assert stream.push(151645) == "" and stream.stopped


def test_stream_holds_back_possible_stop_prefix(tok):
    stream = TextStream(tok, stop=["<|user|>"])
    out = "".join(stream.push(i) for i in tok.encode("Hi <|"))
    assert out == "Hi "  # "<|" could begin the stop string
    out += "".join(stream.push(i) for i in tok.encode("x"))
    assert out == "Hi <|x" and not stream.stopped


def test_stream_rejects_empty_stop_string(tok):
    with pytest.raises(Qwen2PureError, match="non-empty"):
        TextStream(tok, stop=[""])


# ---------------------------------------------------------------------------------------------------------
# Loading errors


def test_from_dir_missing_tokenizer_json(tmp_path):
    with pytest.raises(Qwen2PureError, match="tokenizer.json: file not found"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(Qwen2PureError, match="tokenizer.json is not valid JSON") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_from_dir_corrupt_config(tmp_path, name):
    (tmp_path / "tokenizer.json").write_text(TINY_TOKENIZER_JSON)
    (tmp_path / name).write_text("{not json")
    with pytest.raises(Qwen2PureError, match=f"{name}: not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_optional_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text(TINY_TOKENIZER_JSON)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.generation_config == {} and tok.stop_token_ids == [] and tok.chat_template is None
    assert tok.encode("ab") == [2] and tok.vocab_size == 4 and tok.special_token_ids == {3}
