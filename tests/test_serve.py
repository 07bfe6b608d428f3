"""The server (qwen2_pure/serve): the continuous-batching engine, the OpenAI API through the `openai` client,
errors, concurrency, client disconnects, the `serve` command, and the web page in headless Chromium.

The model is a tiny random Qwen2 (1 layer, hidden 32) with the real Qwen2.5 tokenizer, built like
tests/test_cli.py's: a few hundred English word tokens get loud embedding rows, so greedy decoding emits varied
words and "same text as `qwen2_pure.generate`" is a meaningful check. Servers run in-process (uvicorn in a
thread, on a free port of 127.0.0.1); one test starts `qwen2-pure serve` as a subprocess.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

import qwen2_pure
from qwen2_pure.sampling import SamplingParams
from qwen2_pure.serve.engine import Engine, wait_idle
from hf_utils import WORDS  # common words: the random prompts of the concurrency tests

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from qwen2_pure.serve.app import create_app  # noqa: E402  (needs fastapi)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
MAX_NEW = 16  # generation_config.json's max_new_tokens in the fixture checkpoint



# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(demo_tokenizer_dir, tmp_path_factory):
    """A tiny random Qwen2 checkpoint with the demo's tokenizer (greedy generation_config, max_new_tokens 16)."""
    from hf_utils import make_chat_checkpoint
    return make_chat_checkpoint(tmp_path_factory.mktemp("serve_model"), demo_tokenizer_dir, MAX_NEW)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return qwen2_pure.load_model(model_dir), qwen2_pure.load_tokenizer(model_dir)


class LiveServer:
    """uvicorn serving `app` in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)

    @property
    def engine(self) -> Engine:
        return self.app.state.engine

    def client(self, api_key="EMPTY", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    s = LiveServer(create_app(model, tok, slots=16, max_seq_len=256))
    yield s
    s.close()


@pytest.fixture(scope="module")
def small_server(loaded):
    """One slot, a queue of one, and an API key: for 401 and 429."""
    model, tok = loaded
    s = LiveServer(create_app(model, tok, slots=1, max_queue=1, api_key="sekret", model_name="tiny"))
    yield s
    s.close()


@pytest.fixture
def slow_model(loaded, monkeypatch):
    """Every forward takes at least 15 ms more, so that a generation lasts long enough to be interrupted."""
    model, _ = loaded
    real = model.forward

    def forward(*args, **kwargs):
        time.sleep(0.015)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return model


# ---- helpers ----------------------------------------------------------------------------------------------

def chat_ids(tok, content, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))


def reference(model, tok, ids, max_new_tokens=MAX_NEW, **sampling):
    """(text, token count) of sequential `qwen2_pure.generate`, the server's reference."""
    [new] = qwen2_pure.generate(model, [ids], max_new_tokens=max_new_tokens, stop_token_ids=tok.stop_token_ids,
                                **sampling)
    return tok.decode(new, skip_special_tokens=True), len(new)


def random_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


class Raw:
    """A plain HTTP exchange (standard library), for what the openai client cannot send or must not hide."""

    def __init__(self, url: str, method: str, path: str, body=None, headers=None, timeout: float = 30):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        try:
            self.conn.request(method, path, body=body,
                              headers={"Content-Type": "application/json", **(headers or {})})
            self.response = self.conn.getresponse()
        except BaseException:
            self.conn.close()  # e.g. a timeout: the client goes away
            raise
        self.status = self.response.status

    def json(self):
        return json.loads(self.response.read())

    def text(self) -> str:
        return self.response.read().decode()

    def lines(self):
        while line := self.response.readline():
            yield line.decode().rstrip("\r\n")

    def close(self):
        self.conn.close()


def raw(url, method, path, body=None, **kw) -> tuple[int, dict]:
    r = Raw(url, method, path, body, **kw)
    try:
        return r.status, r.json()
    finally:
        r.close()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ---- the engine, without HTTP -----------------------------------------------------------------------------

def test_fixture_model_is_varied(loaded):
    model, tok = loaded
    texts = {reference(model, tok, tok.encode(p))[0] for p in ("Hello", "the", "What is the meaning of life?")}
    assert len(texts) == 3 and all(len(set(t.split())) >= 2 for t in texts), texts


@pytest.mark.parametrize("slots, max_seq_len", [(16, 256), (3, 64)], ids=["wide", "compacting"])
def test_engine_greedy_equals_sequential_generate(loaded, slots, max_seq_len):
    """Requests arriving at random moments, decoded in shared steps, give generate()'s tokens exactly.

    With 3 slots of 64 tokens the engine must queue, reuse rows, jump the time axis for long prompts and
    compact it when it fills up: all of that must leave the tokens unchanged.
    """
    model, tok = loaded
    rng = random.Random(slots)
    jobs = []
    for i in range(12):
        ids = tok.encode(random_prompt(rng)) if i % 3 else chat_ids(tok, random_prompt(rng))
        ids = ids[:max_seq_len - 8]
        max_tokens = rng.randint(1, min(40, max_seq_len - len(ids)))
        jobs.append((ids, max_tokens))
    expected = [qwen2_pure.generate(model, [ids], max_new_tokens=max_tokens, stop_token_ids=tok.stop_token_ids)[0]
                for ids, max_tokens in jobs]
    engine = Engine(model, tok, slots=slots, max_seq_len=max_seq_len, max_queue=64).start()
    try:
        results: list = [None] * len(jobs)

        def run(i):
            time.sleep(rng.random() * 0.1)
            results[i] = engine.generate(jobs[i][0], jobs[i][1], timeout=60)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(90)
        for (text, ev), ref in zip(results, expected):
            assert text == tok.decode(ref, skip_special_tokens=True)
            assert ev.completion_tokens == len(ref)
            assert ev.finish_reason == ("stop" if ref[-1] in tok.stop_token_ids else "length")
        assert engine.stats["max_batch"] > 1  # requests really shared decode steps
        if max_seq_len == 64:
            assert engine.stats["compactions"] > 0
        assert wait_idle(engine)
        wait_for(lambda: engine.t == 0 and not engine.mask.any(), what="an empty batch to leave a clean axis")
    finally:
        engine.stop()


def test_engine_sampling_per_request(loaded):
    """Each row samples with its own parameters and generator: a seeded request gives generate(seed=...)'s
    tokens even when it shares steps with greedy and differently-seeded neighbours."""
    model, tok = loaded
    ids = tok.encode("Hello there")
    params = [SamplingParams(temperature=1.0, top_k=10, seed=s) for s in (1, 2, 3)] + \
             [SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5, seed=4),
              SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0)]  # greedy with penalties
    expected = [reference(model, tok, ids, 12, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                          repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
                          frequency_penalty=p.frequency_penalty, seed=p.seed)[0] for p in params]
    assert len(set(expected[:3])) > 1  # different seeds, different samples
    engine = Engine(model, tok, slots=8, max_seq_len=128).start()
    try:
        results: list = [None] * len(params)

        def run(i):
            results[i] = engine.generate(ids, 12, params=params[i], timeout=60)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(params))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert results == expected
    finally:
        engine.stop()


def test_engine_stop_strings_and_tokens(loaded):
    model, tok = loaded
    ids = tok.encode("Hello")
    full, _ = reference(model, tok, ids)
    stop = next(f" {w}" for w in full.split() if full.index(f" {w}") > 0)
    engine = Engine(model, tok, slots=2, max_seq_len=64).start()
    try:
        text, ev = engine.generate(ids, MAX_NEW, stop=[stop], timeout=30)
        assert text == full[:full.index(stop)] and ev.finish_reason == "stop"
        assert ev.completion_tokens < MAX_NEW
        first = tok.encode(full)[1]  # a stop token id: the second token of the answer
        text, ev = engine.generate(ids, MAX_NEW, stop_token_ids=[first], timeout=30)
        assert ev.finish_reason == "stop" and ev.completion_tokens == 2
    finally:
        engine.stop()


def test_engine_rejects_bad_settings(loaded):
    model, tok = loaded
    with pytest.raises(qwen2_pure.Qwen2PureError, match="slots"):
        Engine(model, tok, slots=0)
    with pytest.raises(qwen2_pure.Qwen2PureError, match="max_position_embeddings=256"):
        Engine(model, tok, max_seq_len=1000)
    engine = Engine(model, tok, slots=1, max_seq_len=32)
    from qwen2_pure.serve.engine import EngineStopped, Request
    for req, match in [(Request(prompt=[1, 151936], max_tokens=1), "token id 151936"),
                       (Request(prompt=[1] * 30, max_tokens=5), "exceeds max_seq_len=32"),
                       (Request(prompt=[1], max_tokens=0), "max_tokens=0"),
                       (Request(prompt=[1], max_tokens=1), "not running")]:
        with pytest.raises(qwen2_pure.Qwen2PureError, match=match):
            engine.submit(req)
    assert issubclass(EngineStopped, qwen2_pure.Qwen2PureError)


# ---- the OpenAI API through the openai client -------------------------------------------------------------

def test_models_and_health(server):
    client = server.client()
    [m] = client.models.list().data
    assert m.id == server.app.state.info.model_name and m.object == "model"
    status, body = raw(server.url, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["slots"] == 16


def test_chat_non_stream(server, loaded):
    model, tok = loaded
    client = server.client()
    model_id = client.models.list().data[0].id
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello"}])
    text, n = reference(model, tok, chat_ids(tok, "Hello"))
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and n == MAX_NEW  # generation_config's max_new_tokens
    assert r.usage.prompt_tokens == len(chat_ids(tok, "Hello"))
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_id
    # a system message and max_tokens
    r = client.chat.completions.create(model=model_id, max_tokens=5, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}])
    assert r.choices[0].message.content == reference(model, tok, chat_ids(tok, "Hello", "You are terse."), 5)[0]
    assert r.usage.completion_tokens == 5


def test_chat_stream_with_usage(server, loaded):
    model, tok = loaded
    client = server.client()
    text, n = reference(model, tok, chat_ids(tok, "Tell me a story"), 10)
    stream = client.chat.completions.create(model=server.app.state.info.model_name, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Tell me a story"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == text  # streamed in pieces, same text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].choices[0].delta.content in (None, "")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n == 10
    assert chunks[-1].usage.prompt_tokens == len(chat_ids(tok, "Tell me a story"))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    # without include_usage, no usage chunk
    chunks = list(client.chat.completions.create(model=server.app.state.info.model_name, max_tokens=3,
                                                 stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_raw_sse(server):
    """The wire format itself: data lines, blank-line separated, ending with [DONE]."""
    r = Raw(server.url, "POST", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 3})
    assert r.status == 200 and r.response.getheader("content-type").startswith("text/event-stream")
    body = r.text()
    r.close()
    assert body.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in body.strip().split("\n\n"))


def test_completions(server, loaded):
    model, tok = loaded
    client = server.client()
    name = server.app.state.info.model_name
    text, n = reference(model, tok, tok.encode("def fib(n):"), 7)
    r = client.completions.create(model=name, prompt="def fib(n):", max_tokens=7)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == n and r.object == "text_completion"
    chunks = list(client.completions.create(model=name, prompt="def fib(n):", max_tokens=7, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 7
    # token ids as the prompt
    r = client.completions.create(model=name, prompt=tok.encode("def fib(n):"), max_tokens=7)
    assert r.choices[0].text == text


def test_stop_string_and_finish_reason(server, loaded):
    model, tok = loaded
    client = server.client()
    full, _ = reference(model, tok, tok.encode("Hello"))
    stop = next(f" {w}" for w in full.split() if full.index(f" {w}") > 0)
    name = server.app.state.info.model_name
    r = client.completions.create(model=name, prompt="Hello", stop=[stop, "zzz-never"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=name, prompt="Hello", stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_fields(server, loaded):
    """Seeded sampling equals generate(seed=...); vLLM's extra fields arrive through extra_body."""
    model, tok = loaded
    client = server.client()
    name = server.app.state.info.model_name
    ids = tok.encode("Once upon a time")
    for seed in (1, 2):
        r = client.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0.9,
                                      top_p=0.95, seed=seed, presence_penalty=0.3, frequency_penalty=0.2,
                                      extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
        assert r.choices[0].text == reference(model, tok, ids, 8, temperature=0.9, top_p=0.95, top_k=20, min_p=0.01,
                                              repetition_penalty=1.1, presence_penalty=0.3,
                                              frequency_penalty=0.2, seed=seed)[0]
    # ignore_eos: exactly max_tokens tokens even through a stop token
    r = client.completions.create(model=name, prompt="Hello", max_tokens=20, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"


# ---- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=17), "n"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(seed="x"), "seed"), (dict(stop=[""]), "stop"), (dict(extra_body={"top_k": -5}), "top_k"),
    (dict(extra_body={"min_p": 2}), "min_p"), (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(max_tokens=250), "max_tokens"),
])
def test_invalid_sampling_values_are_400(server, extra, param):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.app.state.info.model_name,
                                       messages=[{"role": "user", "content": "Hello"}], **extra)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert param in e.value.message


def test_request_errors(server):
    client = server.client()
    name = server.app.state.info.model_name
    with pytest.raises(openai.BadRequestError, match="role") as e:
        client.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "Hello"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=name, messages=[])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as e:
        client.completions.create(model=name, prompt=" the" * 300)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    # malformed JSON, a body that is not an object, an unknown endpoint: raw HTTP
    for body in (b"{not json", b"[1, 2]", b"", b"\xff\xfe"):
        status, answer = raw(server.url, "POST", "/v1/chat/completions", body)
        assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}, body
    status, answer = raw(server.url, "POST", "/v1/completions", b'{"prompt": "Hi"}',
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "Content-Type" in answer["error"]["message"]
    status, answer = raw(server.url, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in answer
    status, answer = raw(server.url, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in answer
    # and the server is still fine
    assert client.completions.create(model=name, prompt="Hello", max_tokens=2).usage.completion_tokens == 2


def test_api_key(small_server):
    with pytest.raises(openai.AuthenticationError) as e:
        small_server.client(api_key="wrong").models.list()
    assert e.value.status_code == 401
    status, answer = raw(small_server.url, "GET", "/v1/models")  # no key at all
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    client = small_server.client(api_key="sekret")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices[0].text
    assert raw(small_server.url, "GET", "/health")[0] == 200  # health needs no key
    page = Raw(small_server.url, "GET", "/")  # nor the page (it sends the key itself)
    assert page.status == 200 and "chat.js" in page.text()
    page.close()


def test_queue_full_is_429(small_server, slow_model):
    """One slot and a queue of one: a third concurrent request is refused with 429 (RateLimitError)."""
    client = small_server.client(api_key="sekret")
    long = dict(model="tiny", prompt="Hello", max_tokens=200, extra_body={"ignore_eos": True})
    streams = [client.completions.create(stream=True, **long)]
    next(iter(streams[0]))  # the first request holds the slot
    streams.append(client.completions.create(stream=True, **long))  # the second waits in the queue
    wait_for(lambda: small_server.engine.load()["waiting"] == 1, what="a waiting request")
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(**long)
    assert e.value.status_code == 429 and "busy" in e.value.message
    for s in streams:
        s.close()  # disconnect: both are cancelled
    assert wait_idle(small_server.engine, 10)


def test_error_mid_stream_reaches_the_client(server, loaded, monkeypatch):
    """A failure inside the engine after the stream began arrives as an error event: the openai client raises
    APIError; the server goes on serving."""
    model, _ = loaded
    real, calls = model.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated device failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    client = server.client()
    stream = client.chat.completions.create(model=server.app.state.info.model_name, stream=True, max_tokens=10,
                                            messages=[{"role": "user", "content": "Hello"}])
    got = []
    with pytest.raises(openai.APIError, match="simulated device failure"):
        for chunk in stream:
            got.append(chunk)
    assert got and got[0].choices[0].delta.role == "assistant"
    monkeypatch.setattr(model, "forward", real)
    assert client.completions.create(model=server.app.state.info.model_name, prompt="Hello",
                                     max_tokens=3).usage.completion_tokens == 3
    assert raw(server.url, "GET", "/health")[1]["status"] == "ok"


# ---- concurrency and disconnects --------------------------------------------------------------------------

def test_16_concurrent_streaming_clients(server, loaded):
    """16 clients streaming at once are decoded in shared steps and each gets sequential greedy's text."""
    model, tok = loaded
    rng = random.Random(16)
    jobs = []
    for i in range(16):
        prompt = random_prompt(rng)
        kind = "chat" if i % 2 else "completion"
        ids = chat_ids(tok, prompt) if kind == "chat" else tok.encode(prompt)
        jobs.append((kind, prompt, ids, rng.randint(8, 24)))
    expected = [reference(model, tok, ids, max_tokens)[0] for _, _, ids, max_tokens in jobs]
    name = server.app.state.info.model_name
    steps_before = server.engine.stats["steps"]
    barrier = threading.Barrier(16)
    results: list = [None] * 16

    def client_thread(i):
        kind, prompt, _, max_tokens = jobs[i]
        client = server.client()
        barrier.wait()
        if kind == "chat":
            stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=max_tokens, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            stream = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert results == expected
    assert len(set(expected)) > 8
    steps = server.engine.stats["steps"] - steps_before
    assert server.engine.stats["max_batch"] >= 8
    assert steps < sum(m for *_, m in jobs) // 2  # far fewer decode steps than tokens: they were shared


def test_disconnect_mid_stream_frees_the_slot(server, slow_model):
    engine = server.engine
    tokens_before = engine.stats["tokens"]
    r = Raw(server.url, "POST", "/v1/completions",
            {"prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True})
    lines = r.lines()
    got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
    assert len(got) == 3 and engine.load()["running"] == 1
    r.close()  # the client goes away: the engine drops the request at its next step
    wait_for(lambda: engine.load()["running"] == 0, timeout=5, what="the slot to be freed")
    generated = engine.stats["tokens"] - tokens_before
    assert generated < 100, generated  # 200 would take > 3 s at 15 ms a step
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(TimeoutError):
        raw(server.url, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True},
            timeout=0.5)
    wait_for(lambda: engine.load()["running"] == 0, timeout=5, what="the non-streaming request to be dropped")
    assert engine.stats["tokens"] - tokens_before < 200


# ---- the serve command ------------------------------------------------------------------------------------

def test_serve_command_subprocess(model_dir):
    """`qwen2-pure serve` binds 127.0.0.1 by default, answers the API, and stops cleanly on Ctrl-C."""
    env = {k: v for k, v in os.environ.items() if k != "QWEN2_PURE_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "qwen2_pure.cli", "serve", "--model", str(model_dir),
                             "--port", "0", "--served-model-name", "tiny-cli"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        assert any("[serving tiny-cli on http://127.0.0.1:0" in ln for ln in lines), lines
        status, answer = raw(url, "POST", "/v1/chat/completions",
                             {"model": "tiny-cli", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


def test_serve_command_errors(capsys, model_dir):
    from qwen2_pure.cli import main
    assert main(["serve", "--model", str(model_dir), "--slots", "0"]) == 2
    err = capsys.readouterr().err
    assert "slots=0" in err and "Traceback" not in err


# ---- the web page in headless Chromium --------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def conversation(browser) -> list:
    """The page's saved conversation (localStorage): the raw text of every message, with each answer's finish."""
    return browser.execute_script("return JSON.parse(localStorage.getItem('qwen2-pure-chat-conversation'))")


def test_web_chat_page(server, loaded, browser):
    """Send a message in the page, see the streamed answer, regenerate it (every finish line stays), reload
    (conversation and settings stay), clear; every file the page links is served; keep screenshots."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    model, tok = loaded
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), server.app.state.info.model_name))

    # the favicon, the vendored libraries and the page's own files are all served
    urls = browser.execute_script("return [...document.querySelectorAll('link[href], script[src]')]"
                                  ".map((e) => e.href || e.src)")
    assert any(u.endswith("/static/favicon.svg") for u in urls) and len(urls) == 7, urls
    for u in urls:
        r = Raw(server.url, "GET", urlsplit(u).path)
        assert r.status == 200 and r.response.read(), u
        if u.endswith(".svg"):
            assert r.response.getheader("content-type").startswith("image/svg+xml")
        r.close()
    assert "random" in browser.find_element(By.ID, "seed").get_attribute("placeholder")

    def answers():
        return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")

    def finished_answers():
        return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]")

    def meta(div):
        return div.find_element(By.CSS_SELECTOR, ".meta").text

    browser.find_element(By.ID, "input").send_keys("Hello")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(finished_answers()) == 1)
    expected = reference(model, tok, chat_ids(tok, "Hello"))[0]
    saved = conversation(browser)
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["content"] == expected
    assert saved[1]["meta"]["finish"] == "length" and saved[1]["meta"]["tokens"] == MAX_NEW
    assert finished_answers()[0].get_attribute("data-finish") == "length"
    assert "finish: length" in meta(answers()[0]) and f"{MAX_NEW} tokens" in meta(answers()[0])
    # the Markdown shown is the answer's words (the tiny model writes plain words)
    shown = answers()[0].find_element(By.CSS_SELECTOR, ".text").text
    assert shown.split() == expected.split()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_web_chat.png"))

    # a second turn carries the history; regenerate answers it again (greedy: the same text), and the first
    # answer keeps its finish line
    browser.find_element(By.ID, "input").send_keys("And then?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(finished_answers()) == 2)
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": expected},
            {"role": "user", "content": "And then?"}]
    second = reference(model, tok, tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True)))[0]
    assert conversation(browser)[3]["content"] == second
    browser.find_element(By.ID, "regenerate").click()
    wait.until(lambda d: len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4
               and browser.find_elements(By.CSS_SELECTOR, ".msg")[-1].get_attribute("data-finish"))
    assert conversation(browser)[3]["content"] == second
    assert [a.get_attribute("data-finish") for a in answers()] == ["length", "length"]
    assert all("finish: length" in meta(a) for a in answers())

    # a reload keeps the conversation, its finish lines and the settings
    browser.find_element(By.ID, "system").send_keys("Be brief.")
    browser.find_element(By.ID, "temperature").send_keys("0")
    before = conversation(browser)
    browser.refresh()
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), server.app.state.info.model_name))
    assert conversation(browser) == before
    assert [m.get_attribute("class") for m in browser.find_elements(By.CSS_SELECTOR, ".msg")] == \
        ["msg user", "msg assistant", "msg user", "msg assistant"]
    assert all("finish: length" in meta(a) for a in answers())
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Be brief."
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0"
    browser.save_screenshot(str(ARTIFACTS / "serve_web_chat_reloaded.png"))

    # the settings reach the server: the system prompt kept over the reload, max_tokens 3
    browser.find_element(By.ID, "max_tokens").send_keys("3")
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [] and conversation(browser) == []
    browser.find_element(By.ID, "input").send_keys("Hello")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(finished_answers()) == 1)
    assert conversation(browser)[1]["content"] == reference(model, tok, chat_ids(tok, "Hello", "Be brief."), 3)[0]
    assert "3 tokens" in meta(answers()[0])


def scripted_app(answers: list):
    """The web page over a scripted /v1/chat/completions: each request streams the next of `answers`, a pair
    (list of OpenAI `delta` dicts, finish_reason), so the page can be shown any answer, tool calls included.
    The request bodies are kept in app.state.requests."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from qwen2_pure.serve.app import STATIC

    app = FastAPI()
    app.state.requests = []

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def chat(request):
        app.state.requests.append(await request.json())
        deltas, finish = answers.pop(0)

        def chunk(**fields):
            return "data: " + json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                                          "model": "scripted", **fields}) + "\n\n"

        def events():
            yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for d in deltas:
                yield chunk(choices=[{"index": 0, "delta": d, "finish_reason": None}])
            yield chunk(choices=[{"index": 0, "delta": {}, "finish_reason": finish}])
            yield chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": len(deltas),
                                           "total_tokens": 5 + len(deltas)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # plain Starlette endpoints (request in, response out): FastAPI's parameter inference is not wanted here
    app.router.add_route("/", index, methods=["GET"])
    app.router.add_route("/v1/models", models, methods=["GET"])
    app.router.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def test_web_chat_renders_markdown_and_never_runs_model_output(browser):
    """Answers show as Markdown with highlighted code; HTML in an answer (a script, an img with onerror, a
    javascript: link) is shown as text and never runs, streamed or rendered again after a reload; a JSON
    answer and a tool call are pretty-printed. The answers come from a scripted API (the tiny model cannot
    be made to write them)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    script = "<script>window.__pwned=1</script>"
    img = '<img src=x onerror="window.__pwned=2">'
    hostile = ("Here is **bold** and `inline`.\n\n```python\ndef f(x):\n    return x + 1\n```\n\n"
               f"{script}\n\n{img}\n\nInline {img} too, [a link](javascript:window.__pwned=3) and "
               "![a picture](x)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    pieces = [{"content": hostile[i:i + 7]} for i in range(0, len(hostile), 7)]  # tags split across chunks
    data = {"name": "Ada", "langs": ["en", "fr"], "n": 2}
    call = [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris", "unit": "C"}'}}]}]
    app = scripted_app([(pieces, "stop"), ([{"content": json.dumps(data)}], "stop"), (call, "tool_calls")])
    live = LiveServer(app)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(live.url + "/")
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "scripted"))

        def answers():
            return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]")

        def ask(text, n):
            browser.find_element(By.ID, "input").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda d: len(answers()) == n)

        def check_page():
            time.sleep(0.3)  # an image's onerror would have fired by now
            assert browser.execute_script("return window.__pwned") is None
            chat = browser.find_element(By.ID, "chat")
            for tag in ("script", "img", "iframe", "style"):
                assert chat.find_elements(By.TAG_NAME, tag) == [], tag
            first = answers()[0].find_element(By.CSS_SELECTOR, ".text")
            text = first.get_attribute("textContent")
            assert script in text and text.count(img) == 2   # shown as text
            assert first.find_element(By.TAG_NAME, "strong").text == "bold"
            assert first.find_element(By.CSS_SELECTOR, ":not(pre) > code").text == "inline"
            assert len(first.find_elements(By.CSS_SELECTOR, "table td")) == 2
            code = first.find_element(By.CSS_SELECTOR, "pre code.hljs.language-python")
            assert code.get_attribute("textContent").rstrip("\n") == "def f(x):\n    return x + 1"
            assert code.find_element(By.CSS_SELECTOR, ".hljs-keyword").text == "def"   # highlighted
            links = {a.text: a.get_attribute("href") for a in first.find_elements(By.TAG_NAME, "a")}
            assert set(links) == {"a link", "a picture"}, links
            assert not (links["a link"] or "").startswith("javascript:")           # no javascript: URL survives
            second = answers()[1].find_element(By.CSS_SELECTOR, "pre code.language-json")
            assert second.get_attribute("textContent") == json.dumps(data, indent=2)
            tool = answers()[2].find_element(By.CSS_SELECTOR, ".tool-call")
            assert "get_weather" in tool.find_element(By.CSS_SELECTOR, ".tool-title").text
            assert tool.find_element(By.TAG_NAME, "code").get_attribute("textContent") == \
                json.dumps({"city": "Paris", "unit": "C"}, indent=2)
            assert answers()[2].get_attribute("data-finish") == "tool_calls"

        ask("Show me Markdown", 1)
        browser.find_element(By.ID, "tools").send_keys('[{"type": "function", "function": {"name": "get_weather"}}]')
        ask("Some JSON", 2)
        ask("The weather?", 3)
        check_page()
        ARTIFACTS.mkdir(exist_ok=True)
        browser.execute_script("document.getElementById('chat').scrollTop = 0")
        browser.save_screenshot(str(ARTIFACTS / "serve_web_chat_markdown.png"))
        browser.execute_script("const c = document.getElementById('chat'); c.scrollTop = c.scrollHeight")
        browser.save_screenshot(str(ARTIFACTS / "serve_web_chat_tool_call.png"))
        # what was sent: the tools setting as JSON, the earlier answers as they were streamed
        sent = app.state.requests
        assert sent[1]["tools"] == [{"type": "function", "function": {"name": "get_weather"}}]
        assert sent[1]["messages"][1] == {"role": "assistant", "content": hostile}
        assert sent[2]["messages"][3] == {"role": "assistant", "content": json.dumps(data)}
        # the saved conversation goes through the same rendering after a reload
        browser.refresh()
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "scripted"))
        assert len(answers()) == 3
        check_page()
        assert conversation(browser)[5]["tool_calls"] == [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]
    finally:
        live.close()


# ---- one request's values never hurt its neighbours; the compiled step ------------------------------------

def test_degenerate_sampling_values_beside_a_running_stream(server, loaded, monkeypatch):
    """While a greedy stream runs, a request with temperature=1e-40 (greedy: vLLM's rule) and one with
    repetition_penalty=1e-300 (the +inf logits saturate) both get 200s, and the stream ends exactly as alone."""
    model, tok = loaded
    name = server.app.state.info.model_name
    story = "Tell me a long story about the sea"
    expected = reference(model, tok, tok.encode(story), 60)[0]
    expected_tiny = reference(model, tok, tok.encode("Hello"), 8)[0]
    expected_penalised = reference(model, tok, tok.encode("Once upon a time"), 8, temperature=1.0,
                                   repetition_penalty=1e-300, seed=3)[0]
    real, batches = model.forward, []

    def forward(input_ids, *args, **kwargs):  # slow enough that the stream is still running; record batch sizes
        batches.append(input_ids.shape[0])
        time.sleep(0.015)
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    stream = iter(server.client().completions.create(model=name, prompt=story, max_tokens=60, stream=True))
    pieces = [next(stream).choices[0].text]  # the stream runs
    results = {}

    def ask(key, **kw):
        results[key] = server.client().completions.create(model=name, max_tokens=8, **kw)

    threads = [threading.Thread(target=ask, args=("tiny",), kwargs=dict(prompt="Hello", temperature=1e-40)),
               threading.Thread(target=ask, args=("penalised",), kwargs=dict(
                   prompt="Once upon a time", temperature=1.0, seed=3, extra_body={"repetition_penalty": 1e-300}))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    pieces += [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == expected
    assert results["tiny"].choices[0].text == expected_tiny
    assert results["penalised"].choices[0].text == expected_penalised
    assert results["penalised"].usage.completion_tokens > 0
    assert max(batches) >= 2  # the requests shared decode steps with the stream
    assert raw(server.url, "GET", "/health")[1]["status"] == "ok"


def test_compiled_server_runs_the_compiled_step(server, model_dir, loaded):
    """A server over a model loaded with compile=True (`serve --compile`) decodes with the compiled step
    (`fast.decode_step_for(model).calls`) and answers what the eager server answers."""
    from qwen2_pure.fast import decode_step_for
    _, tok = loaded
    compiled = qwen2_pure.load_model(model_dir, compile=True)
    s = LiveServer(create_app(compiled, tok, slots=2, max_seq_len=64))
    try:
        name = s.app.state.info.model_name
        request = dict(model=name, prompt="def fib(n):", max_tokens=8)
        r = s.client().completions.create(**request)
        eager = server.client().completions.create(**request)
        assert r.choices[0].text == eager.choices[0].text and r.usage == eager.usage
        assert decode_step_for(compiled).calls == r.usage.completion_tokens - 1 > 0  # every decode step compiled
    finally:
        s.close()
