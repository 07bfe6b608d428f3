"""The server's API beyond plain generation: logprobs, n > 1 with seeds, /tokenize and /detokenize, /metrics and
Qwen2.5-Coder fill-in-the-middle, through the `openai` client (or plain HTTP where it has no method) against a
live server (tests/test_serve.py's fixtures: its tiny random model with the real Qwen2.5-Coder tokenizer, 16 slots
of 256 tokens).

Log-probabilities are checked against our own `log_softmax` of the model's logits for the same prefix (a full
forward, no cache), i.e. the model's raw distribution, vLLM's default.
"""

from __future__ import annotations

import json

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from qwen2_pure.serve import protocol  # noqa: E402
from qwen2_pure.serve.app import create_app  # noqa: E402
from test_serve import Raw, chat_ids, loaded, model_dir, raw, server, slow_model, wait_for  # noqa: E402,F401

FIM_IDS = {"<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
           "<|repo_name|>": 151663, "<|file_sep|>": 151664}  # QwenLM/Qwen2.5-Coder README


def greedy_reference(model, ids, steps, k, stop_ids=()):
    """[(token, log p(token), [(id, log p)] top k)] of greedy decoding by full forwards: log_softmax of the raw
    logits at each prefix."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
            t = int(lp.argmax())
            top = torch.topk(lp, k)
            out.append((t, float(lp[t]), list(zip(top.indices.tolist(), top.values.tolist()))))
            ids.append(t)
            if t in stop_ids:
                break
    return out


def metrics(server) -> dict:
    """{(name, frozenset of labels): value} of every sample /metrics exposes."""
    r = Raw(server.url, "GET", "/metrics")
    try:
        assert r.status == 200 and r.response.getheader("content-type").startswith("text/plain")
        text = r.text()
    finally:
        r.close()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(values: dict, name: str, **labels) -> float:
    """The one sample of `name` with these labels (0 for a labelled series not yet created)."""
    hits = [v for (n, ls), v in values.items() if n == name and set(labels.items()) <= ls]
    assert len(hits) <= 1 and (hits or labels), f"{name} {labels}: {len(hits)} samples"
    return hits[0] if hits else 0.0


# ---- logprobs ---------------------------------------------------------------------------------------------------

def test_chat_logprobs_are_the_raw_log_softmax(server, loaded):
    model, tok = loaded
    client, name = server.client(), server.app.state.info.model_name
    messages = [{"role": "user", "content": "hello there"}]
    ref = greedy_reference(model, chat_ids(tok, "hello there"), 6, 5, tok.stop_token_ids)
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref) == r.usage.completion_tokens
    for entry, (t, lp, top) in zip(content, ref):
        assert entry.token == tok.decode([t])
        if "\ufffd" not in entry.token:  # a piece of a character has its own bytes, not U+FFFD's
            assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert [x.token for x in entry.top_logprobs] == [tok.decode([i]) for i, _ in top]
        assert [x.logprob for x in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
        values = [x.logprob for x in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    text_bytes = b"".join(bytes(e.bytes) for e in content if e.token not in ("<|im_end|>", "<|endoftext|>"))
    assert text_bytes.decode("utf-8", "replace") == r.choices[0].message.content

    # streamed: each chunk carries its own tokens' logprobs; together they are the same list
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=5, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes, [x.token for x in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.bytes, [x.token for x in e.top_logprobs]) for e in content]
    # (the prompt cache served this prompt's prefix: the same values up to rounding)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)

    # logprobs without top_logprobs: the chosen token only
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=3, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[]] * 3
    assert r.choices[0].logprobs.content[0].logprob == pytest.approx(ref[0][1], abs=1e-4)
    # none asked for, none given
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=3)
    assert r.choices[0].logprobs is None


def test_completion_logprobs(server, loaded):
    model, tok = loaded
    client, name = server.client(), server.app.state.info.model_name
    prompt = "def fib(n):"
    ref = greedy_reference(model, tok.encode(prompt), 5, 3)
    r = client.completions.create(model=name, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "length"
    assert lp.tokens == [tok.decode([t]) for t, _, _ in ref]
    assert lp.token_logprobs == pytest.approx([v for _, v, _ in ref], abs=1e-4)
    for top, token, (_, _, ref_top) in zip(lp.top_logprobs, lp.tokens, ref):
        assert token in top and len(top) >= 3
        assert {k: top[k] for k in [tok.decode([i]) for i, _ in ref_top]} == \
            pytest.approx({tok.decode([i]): v for i, v in ref_top}, abs=1e-4)
    # text_offset: where each token starts in the returned text (vLLM's convention: 0 = its start)
    assert lp.text_offset[0] == 0
    assert all(r.choices[0].text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens) if "\ufffd" not in t)
    assert lp.text_offset == sorted(lp.text_offset)

    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                                            stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


@pytest.mark.parametrize("kind, extra, param", [
    ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("chat", {"logprobs": 3}, "logprobs"),  # chat's is a boolean
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 17}, "n"),  # more than 16 (and than the server's 16 slots)
    ("completion", {"suffix": 5}, "suffix"),
])
def test_invalid_fields_are_400_naming_them(server, kind, extra, param):
    body = {"max_tokens": 2, **extra}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    status, out = raw(server.url, "POST", path, body)
    assert status == 400 and out["error"]["param"] == param, out


# ---- n > 1 -------------------------------------------------------------------------------------------------------

def test_n_choices_are_independent_and_reproducible(server):
    client, name = server.client(), server.app.state.info.model_name
    kw = dict(model=name, messages=[{"role": "user", "content": "tell me a story"}], max_tokens=8, temperature=1.0,
              seed=1234)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # the same seed: the same three choices
    assert len(set(texts)) == 3  # independent draws
    assert a.usage.completion_tokens == b.usage.completion_tokens <= 3 * 8
    if all(c.finish_reason == "length" for c in a.choices):
        assert a.usage.completion_tokens == 3 * 8  # the three choices' tokens summed
    # choice 0 is what n=1 with that seed gives (row 0 of generate(seed=) is seeded with the seed itself)
    assert client.chat.completions.create(n=1, **kw).choices[0].message.content == texts[0]
    # streamed: chunks carry their choice's index; each choice's text is the same as unstreamed
    pieces = ["", "", ""]
    finished = set()
    usage = None
    for chunk in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert pieces == texts and finished == {0, 1, 2}
    assert usage.completion_tokens == a.usage.completion_tokens
    assert usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once


def test_n_greedy_gives_identical_choices_and_sums_usage(server):
    client, name = server.client(), server.app.state.info.model_name
    r = client.completions.create(model=name, prompt="def fib(n):", max_tokens=5, temperature=0, n=2)
    one = client.completions.create(model=name, prompt="def fib(n):", max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [one.choices[0].text] * 2
    assert r.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert r.usage.prompt_tokens == one.usage.prompt_tokens


def test_a_disconnect_cancels_every_choice(server, slow_model):
    engine = server.engine
    r = Raw(server.url, "POST", "/v1/completions",
            {"prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True, "n": 3, "temperature": 1.0})
    lines = r.lines()
    seen = set()
    while len(seen) < 3:  # until every choice has streamed something
        line = next(lines)
        if line.startswith("data: {"):
            seen.update(c["index"] for c in json.loads(line[6:])["choices"])
    assert engine.load()["running"] == 3
    r.close()
    wait_for(lambda: engine.load()["running"] == 0, timeout=5, what="all three rows to be freed")
    # a non-streaming request with n = 3 whose client gives up
    with pytest.raises(TimeoutError):
        raw(server.url, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "n": 3},
            timeout=0.5)
    wait_for(lambda: engine.load()["running"] == 0, timeout=5, what="the non-streaming choices to be dropped")


# ---- /tokenize and /detokenize -------------------------------------------------------------------------------------

def test_tokenize_and_detokenize(server, loaded):
    _, tok = loaded
    url = server.url
    text = "def fib(n): 你好 ✓"
    status, out = raw(url, "POST", "/tokenize", {"prompt": text})
    assert status == 200
    assert out == {"count": len(tok.encode(text)), "max_model_len": 256, "tokens": tok.encode(text)}
    status, back = raw(url, "POST", "/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and back["prompt"] == text and back["content"] == text
    # llama.cpp's field name, and the pieces
    status, out2 = raw(url, "POST", "/tokenize", {"content": text, "return_token_strs": True})
    assert out2["tokens"] == out["tokens"] and out2["token_strs"] == [tok.id_to_token(i) for i in out["tokens"]]
    # a chat is rendered exactly as /v1/chat/completions renders it (its count is the request's prompt_tokens)
    status, chat = raw(url, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["tokens"] == chat_ids(tok, "hi")
    r = server.client().chat.completions.create(model=server.app.state.info.model_name, max_tokens=1,
                                                messages=[{"role": "user", "content": "hi"}])
    assert r.usage.prompt_tokens == chat["count"]
    # special tokens come back as text
    status, back = raw(url, "POST", "/detokenize", {"tokens": chat["tokens"]})
    assert back["prompt"] == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"messages": "hi"}, "messages"),
    ("/tokenize", {"prompt": "a", "model": 3}, "model"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
])
def test_tokenize_errors_name_the_field(server, path, body, param):
    status, out = raw(server.url, "POST", path, body)
    assert status == 400 and out["error"]["param"] == param, out


# ---- /metrics ------------------------------------------------------------------------------------------------------

def test_metrics_move_with_requests(server, loaded):
    _, tok = loaded
    client, name = server.client(), server.app.state.info.model_name
    before = metrics(server)
    prompt = "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)  # the same long prefix twice"
    assert len(tok.encode(prompt)) >= 16  # long enough for the prompt cache
    first = client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
    raw(server.url, "POST", "/v1/completions", {"prompt": "hi", "logprobs": 99})  # a 400
    after = metrics(server)

    def moved(metric, **labels):
        return sample(after, "qwen2_pure:" + metric, **labels) - sample(before, "qwen2_pure:" + metric, **labels)

    assert moved("requests_total", endpoint="/v1/completions", status="200") == 2
    assert sample(after, "qwen2_pure:requests_total", endpoint="/v1/completions", status="400") >= 1
    generated = first.usage.completion_tokens + second.usage.completion_tokens
    assert moved("generation_tokens_total") == generated
    assert moved("prompt_tokens_total") == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert moved("prompt_cache_hits_total") >= 1  # the second request reused the first one's prefix
    assert moved("prompt_cache_hit_tokens_total") >= 16
    assert moved("time_to_first_token_seconds_count") == 2
    assert moved("time_per_output_token_seconds_count") == generated - 2
    assert moved("e2e_request_latency_seconds_count") == 2
    assert sample(after, "qwen2_pure:num_requests_running") == 0
    assert sample(after, "qwen2_pure:num_requests_waiting") == 0
    assert all(dict(labels).get("model_name", name) == name for _, labels in after)


def test_two_apps_have_their_own_registries(loaded):
    model, tok = loaded
    a = create_app(model, tok, slots=1, max_seq_len=64)
    b = create_app(model, tok, slots=1, max_seq_len=64)  # no "Duplicated timeseries" error
    assert a.state.metrics.registry is not b.state.metrics.registry


# ---- fill-in-the-middle ----------------------------------------------------------------------------------------------

def test_fim_prompt_is_the_documented_format(loaded):
    _, tok = loaded
    assert protocol.fim_prompt("def f(x):\n    ", "\n    return y") == \
        "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>"
    assert {t: tok.token_to_id(t) for t in FIM_IDS} == FIM_IDS  # the demo (Qwen2.5-Coder) tokenizer has them
    info = protocol.ServerInfo("m", tok, vocab_size=151936, max_seq_len=256, eos_ids=(151645, 151643))
    gen = protocol.parse_completion({"prompt": "def f(x):\n    ", "suffix": "\n    return y"}, info)
    assert gen.prompt_ids == tok.encode(protocol.fim_prompt("def f(x):\n    ", "\n    return y"))
    assert gen.prompt_ids[0] == 151659 and gen.prompt_ids[-1] == 151660 and 151661 in gen.prompt_ids
    # the middle ends at <|endoftext|>, any FIM/repo token or <|im_end|> (Qwen's example's stop list)
    assert set(gen.stop_token_ids) == {151643, 151645} | set(FIM_IDS.values())
    assert gen.stop == []  # all of them are special in this tokenizer: skip_special_tokens keeps them out
    # token ids as the prompt
    ids = tok.encode("def f(x):\n    ")
    gen2 = protocol.parse_completion({"prompt": ids, "suffix": "\n    return y"}, info)
    assert gen2.prompt_ids == gen.prompt_ids
    # ignore_eos: no stop at all, as without suffix
    assert protocol.parse_completion({"prompt": "a", "suffix": "b", "ignore_eos": True}, info).stop_token_ids == []


class _NoFimTokenizer:
    """The demo tokenizer as a model without FIM tokens sees it (and, with `special=False`, one whose FIM
    tokens are not special, as in some tokenizer.json files)."""

    def __init__(self, tok, has_fim=True, special=True):
        self.tok, self.has_fim, self.special = tok, has_fim, special

    def token_to_id(self, t):
        return self.tok.token_to_id(t) if self.has_fim or t not in FIM_IDS else None

    @property
    def special_token_ids(self):
        return self.tok.special_token_ids if self.special else frozenset()

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_fim_without_fim_tokens_is_400_naming_suffix(loaded):
    _, tok = loaded
    info = protocol.ServerInfo("m", _NoFimTokenizer(tok, has_fim=False), vocab_size=151936, max_seq_len=256)
    with pytest.raises(protocol.APIError) as e:
        protocol.parse_completion({"prompt": "a", "suffix": "b"}, info)
    assert e.value.status == 400 and e.value.param == "suffix" and "<|fim_prefix|>" in e.value.message
    # without suffix the same model completes as always
    assert protocol.parse_completion({"prompt": "a"}, info).prompt_ids == tok.encode("a")
    # FIM tokens that are not special would survive skip_special_tokens: they become stop strings too
    info = protocol.ServerInfo("m", _NoFimTokenizer(tok, special=False), vocab_size=151936, max_seq_len=256)
    gen = protocol.parse_completion({"prompt": "a", "suffix": "b", "stop": ["\n\n"]}, info)
    assert gen.stop[0] == "\n\n" and set(gen.stop[1:]) == set(protocol.FIM_STOP_TOKENS)


def test_fim_completion_stops_at_the_end_of_the_middle(server, loaded, monkeypatch):
    """The model ends the middle with <|file_sep|> on its third token: the answer is the first two, and the
    FIM token's text is not in it."""
    model, tok = loaded
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))"
    fim_ids = tok.encode(protocol.fim_prompt(prefix, suffix))
    ref = greedy_reference(model, fim_ids, 2, 1)
    real, calls = model.forward, []

    def forward(*args, **kwargs):
        logits = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:  # prefill (token 1), decode (token 2), decode (token 3: the end of the middle)
            logits[..., FIM_IDS["<|file_sep|>"]] += 1e4
        return logits

    monkeypatch.setattr(model, "forward", forward)
    client, name = server.client(), server.app.state.info.model_name
    r = client.completions.create(model=name, prompt=prefix, suffix=suffix, max_tokens=10, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3
    assert r.choices[0].text == tok.decode([t for t, _, _ in ref], skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(fim_ids)
