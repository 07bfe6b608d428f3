"""A bounded soak test of the server: many concurrent clients mixing good, malformed, abandoned, tool and
JSON-schema requests for a fixed time; afterwards nothing has leaked and the server still serves.

    python benchmarks/serve_soak.py                               # tiny random model, 32 clients, 60 s
    python benchmarks/serve_soak.py --seconds 300 --model demo    # the demo checkpoint (Qwen2.5-Coder-0.5B)
    python benchmarks/serve_soak.py --seconds 15 --clients 8 --out /tmp/soak.json

The server (`create_app` under uvicorn) runs in this process, on a free port of 127.0.0.1, so that the engine's
own state can be inspected afterwards; the clients are threads speaking plain HTTP (standard library). Each
client loops until the time is up, drawing a kind of request (seeded, so a run is repeatable):

- good: greedy chat (streamed or not) or completion (streamed) on a fixed set of prompts, some behind a shared
  system prompt (the prompt cache's hits); the text, finish reason and token count must equal
  `qwen2_pure.generate` alone for that prompt, computed before the run.
- sampled: a seeded sampled chat; it must finish with a text and a token count.
- malformed: bad JSON, a body that is not an object, bad fields, a wrong content type or model, a wrong
  method; the answer must be OpenAI's error body with the expected status (400, 404, 405).
- disconnect: a stream closed after a few events, a non-streamed request given up by its client, a body cut
  off half-way, a request closed before any answer.
- tools / json_schema: a call forced by `tool_choice: "required"` (streamed; its arguments must be valid JSON
  of the declared schema) and `response_format` json_schema (the content must be a JSON object of the schema).
  A kind that the server refuses with a 4xx when the run starts is skipped, with the server's reason noted.

Phases: a warm-up (the same load), then idle; the baseline is taken there (RSS after a garbage collection,
file descriptors, threads outside the executors' bounded pools, the prefix pool's bytes, request objects
alive); then the soak itself, then idle again and the same figures. The run passes when every request got
its expected answer, the engine is idle with every cache row free (no running or waiting request, time axis
at 0, mask all zero), the prefix pool within its budget, no file descriptor, thread or request object left
behind, RSS at the end within `--rss-bound-mb` of the baseline (growth of the prefix pool, a bounded cache,
is allowed on top), and /health and one more greedy request still answer.
Results: JSON (`--out`, default benchmarks/results/serve_soak.json) and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import logging
import os
import platform
import random
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = ("You are a careful assistant for a team that writes small programs. Answer in plain words, name "
          "the steps you take, and keep every answer short.")
PROMPTS = ["Hello", "What is a cache?", "Tell me about the sea and the long river", "Write one line about time",
           "How many people live in the old town", "Name a color", "Why is water wet", "Give me a word",
           "What did the first man say", "Explain the way home", "Count to three", "Say something new"]
COMPLETIONS = ["def fib(n):", "The little house by the water", "Once upon a time there", "import os\n"]
MAX_TOKENS = (4, 8, 16, 24)
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                           "confidence": {"type": "integer", "enum": [1, 2, 3]}},
          "required": ["answer", "confidence"], "additionalProperties": False}
_CHAT = [{"role": "user", "content": "hi"}]
# (name, method, path, body bytes, content type, expected status): each must be answered with OpenAI's error body
MALFORMED = [
    ("not json", "POST", "/v1/chat/completions", b'{"messages": [', "application/json", 400),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", "application/json", 400),
    ("not utf-8", "POST", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', "application/json", 400),
    ("no messages", "POST", "/v1/chat/completions", b'{"messages": []}', "application/json", 400),
    ("unknown role", "POST", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "application/json", 400),
    ("negative temperature", "POST", "/v1/chat/completions",
     json.dumps({"messages": _CHAT, "temperature": -1}).encode(), "application/json", 400),
    ("top_p a string", "POST", "/v1/chat/completions",
     json.dumps({"messages": _CHAT, "top_p": "high"}).encode(), "application/json", 400),
    ("max_tokens 0", "POST", "/v1/chat/completions",
     json.dumps({"messages": _CHAT, "max_tokens": 0}).encode(), "application/json", 400),
    ("over the context", "POST", "/v1/chat/completions",
     json.dumps({"messages": _CHAT, "max_tokens": 10 ** 7}).encode(), "application/json", 400),
    ("100 stop strings", "POST", "/v1/chat/completions",
     json.dumps({"messages": _CHAT, "stop": ["x"] * 100}).encode(), "application/json", 400),
    ("n 0", "POST", "/v1/chat/completions", json.dumps({"messages": _CHAT, "n": 0}).encode(), "application/json", 400),
    ("form post", "POST", "/v1/chat/completions", b"messages=hi", "application/x-www-form-urlencoded", 400),
    ("empty prompt", "POST", "/v1/completions", b'{"prompt": ""}', "application/json", 400),
    ("token id out of range", "POST", "/v1/completions", b'{"prompt": [-5, 3]}', "application/json", 400),
    ("another model", "POST", "/v1/chat/completions",
     json.dumps({"messages": _CHAT, "model": "no-such-model"}).encode(), "application/json", 404),
    ("wrong method", "GET", "/v1/chat/completions", b"", "application/json", 405),
]
# kind -> weight of the draw
KINDS = {"chat_stream": 6, "chat": 2, "completion_stream": 2, "sampled": 1, "malformed": 3, "disconnect": 3,
         "tools": 1, "json_schema": 1}


# ---- the model and its expected answers -----------------------------------------------------------------------

def tiny_checkpoint(directory: Path, tokenizer_dir: Optional[Path] = None) -> Path:
    """A random 1-layer Qwen2 (hidden 32) with the demo's Qwen2.5 tokenizer (from `tokenizer_dir`, else rebuilt
    from the demo GGUF). 400 tokens that are a space and a lower-case word get large embedding rows and the final
    norm random signs, so that greedy answers are varied words: an answer mixed up with another row's shows."""
    import torch
    import transformers

    import qwen2_pure
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        from qwen2_pure.loading.demo import demo_gguf_path
        from qwen2_pure.loading.gguf import open_gguf
        from qwen2_pure.loading.gguf_tokenizer import gguf_tokenizer_files
        text, tok_cfg, gen_cfg = gguf_tokenizer_files(open_gguf(demo_gguf_path()))
        files = {"tokenizer.json": text, "tokenizer_config.json": json.dumps(tok_cfg),
                 "generation_config.json": json.dumps(gen_cfg)}
    else:
        files = {n: (Path(tokenizer_dir) / n).read_text(encoding="utf-8")
                 for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")}
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                   tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    tok = qwen2_pure.load_tokenizer(directory)
    words = re.compile(r" [a-z]{3,}")
    ids = [i for i in range(300, 20000) if words.fullmatch(tok.decode([i]))][:400]
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        model.get_input_embeddings().weight[ids] = torch.randn(len(ids), cfg.hidden_size, generator=g)
        model.model.norm.weight.mul_(torch.randint(0, 2, (cfg.hidden_size,), generator=g) * 2.0 - 1.0)
    model.save_pretrained(directory)
    gen = json.loads(files["generation_config.json"])
    gen.update(max_new_tokens=max(MAX_TOKENS))
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return directory


@dataclass
class Good:
    """A greedy request and the answer `qwen2_pure.generate` gives alone."""

    path: str
    body: dict
    text: str
    tokens: int
    finish: str


def good_requests(model, tok) -> list[Good]:
    import qwen2_pure
    stop_ids = list(model.generation_config.eos_token_id)
    out = []

    def add(path, body, ids, max_tokens):
        [new] = qwen2_pure.generate(model, [ids], max_new_tokens=max_tokens, stop_token_ids=stop_ids)
        finish = "stop" if new and new[-1] in stop_ids else "length"
        body = {**body, "max_tokens": max_tokens, "temperature": 0}
        out.append(Good(path, body, tok.decode(new, skip_special_tokens=True), len(new), finish))

    for i, prompt in enumerate(PROMPTS):
        messages = ([{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        add("/v1/chat/completions", {"messages": messages}, ids, MAX_TOKENS[i % len(MAX_TOKENS)])
    for i, prompt in enumerate(COMPLETIONS):
        add("/v1/completions", {"prompt": prompt}, tok.encode(prompt), MAX_TOKENS[(i + 1) % len(MAX_TOKENS)])
    return out


# ---- HTTP, standard library ------------------------------------------------------------------------------------

class Exchange:
    """One request on its own connection; `events()` reads a stream's data lines as JSON ([DONE] ends it)."""

    def __init__(self, port: int, method: str, path: str, body: bytes = b"", content_type="application/json",
                 timeout: float = 120):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            self.conn.request(method, path, body=body, headers={"Content-Type": content_type})
            self.resp = self.conn.getresponse()
        except BaseException:
            self.conn.close()
            raise
        self.status = self.resp.status

    def json(self):
        return json.loads(self.resp.read())

    def events(self):
        while line := self.resp.readline():
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                return
            yield json.loads(line[6:])
        raise AssertionError("the stream ended without data: [DONE]")

    def close(self):
        self.conn.close()


def post(port: int, path: str, body: dict, **kw) -> Exchange:
    return Exchange(port, "POST", path, json.dumps(body).encode(), **kw)


def read_stream(ex: Exchange) -> dict:
    """text, finish reason, token count and tool calls of a streamed answer (chat or completion)."""
    text, finish, tokens, calls, first = [], None, None, {}, None
    for chunk in ex.events():
        if "error" in chunk:
            raise AssertionError(f"error event: {chunk['error']}")
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            if piece:
                first = first or time.perf_counter()
                text.append(piece)
            for d in (choice.get("delta") or {}).get("tool_calls") or []:
                c = calls.setdefault(d["index"], {"name": "", "arguments": ""})
                c["name"] += (d.get("function") or {}).get("name") or ""
                c["arguments"] += (d.get("function") or {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return {"text": "".join(text), "finish": finish, "tokens": tokens, "calls": [calls[i] for i in sorted(calls)],
            "first": first}


# ---- the clients -------------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What the clients saw: counts, latencies (s) and errors by kind, shared by every client thread."""

    counts: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    ttft: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, seconds: float, error: Optional[str] = None, first: Optional[float] = None):
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.latency.setdefault(kind, []).append(seconds)
            if first is not None:
                self.ttft.append(first)
            if error is not None:
                self.errors.append(f"{kind}: {error}")


class Clients:
    def __init__(self, port: int, goods: list[Good], kinds: dict):
        self.port, self.goods, self.kinds = port, goods, kinds

    def run(self, n: int, seconds: float, seed: int) -> Tally:
        tally = Tally()
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._loop, args=(random.Random(seed * 1000 + i), deadline, tally),
                                    name=f"soak-client-{i}", daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 300)
        if any(t.is_alive() for t in threads):
            tally.errors.append("a client thread did not finish within 300 s of the deadline")
        return tally

    def _loop(self, rng: random.Random, deadline: float, tally: Tally) -> None:
        names, weights = list(self.kinds), list(self.kinds.values())
        while time.monotonic() < deadline:
            kind = rng.choices(names, weights)[0]
            t0 = time.perf_counter()
            first = None
            try:
                first = getattr(self, kind)(rng)
                error = None
            except Exception as e:  # an assertion or a transport failure: the request went wrong
                error = f"{type(e).__name__}: {e}"[:500]
            tally.record(kind, time.perf_counter() - t0, error, first - t0 if first else None)

    # each returns the time of the first streamed text (or None) and raises on a wrong answer

    def _good(self, good: Good, stream: bool):
        body = {**good.body, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        ex = post(self.port, good.path, body)
        try:
            assert ex.status == 200, f"HTTP {ex.status}: {ex.resp.read()[:300]!r}"
            if stream:
                got = read_stream(ex)
            else:
                j = ex.json()
                choice = j["choices"][0]
                got = {"text": choice["message"]["content"] if "message" in choice else choice["text"],
                       "finish": choice["finish_reason"], "tokens": j["usage"]["completion_tokens"], "first": None}
        finally:
            ex.close()
        want = (good.text, good.finish, good.tokens)
        assert (got["text"], got["finish"], got["tokens"]) == want, \
            f"{good.body.get('messages', good.body.get('prompt'))!r}: got {got['text']!r} " \
            f"({got['finish']}, {got['tokens']}), expected {want!r}"
        return got["first"]

    def chat_stream(self, rng):
        return self._good(rng.choice([g for g in self.goods if "messages" in g.body]), True)

    def chat(self, rng):
        return self._good(rng.choice([g for g in self.goods if "messages" in g.body]), False)

    def completion_stream(self, rng):
        return self._good(rng.choice([g for g in self.goods if "prompt" in g.body]), True)

    def sampled(self, rng):
        ex = post(self.port, "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "temperature": 0.9, "top_p": 0.95,
                   "seed": rng.randrange(1 << 31), "max_tokens": rng.choice(MAX_TOKENS), "stream": True,
                   "stream_options": {"include_usage": True}})
        try:
            assert ex.status == 200, f"HTTP {ex.status}"
            got = read_stream(ex)
        finally:
            ex.close()
        assert got["finish"] in ("stop", "length") and got["tokens"] and got["tokens"] >= 1, got
        return got["first"]

    def malformed(self, rng):
        name, method, path, body, ctype, status = rng.choice(MALFORMED)
        ex = Exchange(self.port, method, path, body, ctype)
        try:
            assert ex.status == status, f"{name}: HTTP {ex.status}, expected {status}"
            err = ex.json()["error"]
            assert isinstance(err["message"], str) and err["message"], f"{name}: {err}"
        finally:
            ex.close()

    def disconnect(self, rng):
        how = rng.choice(("mid-stream", "gave up", "cut body", "before answer"))
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": 200,
                "ignore_eos": True, "temperature": 0}
        if how == "mid-stream":
            ex = post(self.port, "/v1/chat/completions", {**body, "stream": True})
            try:
                assert ex.status == 200, f"HTTP {ex.status}"
                events = ex.events()
                for _ in range(rng.randint(1, 4)):
                    next(events, None)
            finally:
                ex.close()
        elif how == "gave up":
            try:
                post(self.port, "/v1/chat/completions", body, timeout=rng.uniform(0.05, 0.3)).close()
            except (TimeoutError, socket.timeout):
                pass
        else:
            raw = json.dumps({**body, "stream": True}).encode()
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            try:
                length = len(raw) + (50 if how == "cut body" else 0)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)
                sock.sendall(raw if how == "before answer" else raw[:len(raw) // 2])
            finally:
                sock.close()

    def tools(self, rng):
        ex = post(self.port, "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "The weather in " + rng.choice(["Paris", "Rome"])}],
                   "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 64,
                   "temperature": 0, "stream": True})
        try:
            assert ex.status == 200, f"HTTP {ex.status}: {ex.resp.read()[:300]!r}"
            got = read_stream(ex)
        finally:
            ex.close()
        assert got["finish"] == "tool_calls" and got["calls"], got
        for call in got["calls"]:
            args = json.loads(call["arguments"])
            assert call["name"] == "get_weather" and args["city"] in ("Paris", "Rome", "Oslo") \
                and args["unit"] in ("C", "F") and len(args) == 2, call
        return got["first"]

    def json_schema(self, rng):
        ex = post(self.port, "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": 64,
                   "temperature": 0,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}})
        try:
            assert ex.status == 200, f"HTTP {ex.status}: {ex.resp.read()[:300]!r}"
            choice = ex.json()["choices"][0]
        finally:
            ex.close()
        answer = json.loads(choice["message"]["content"])
        assert choice["finish_reason"] == "stop" and set(answer) == {"answer", "confidence"} \
            and answer["answer"] in ("yes", "no") and answer["confidence"] in (1, 2, 3), choice


def probe(clients: Clients, kind: str) -> Optional[str]:
    """None if the server takes `kind` now, else why not (its 4xx answer, or the failure)."""
    try:
        getattr(clients, kind)(random.Random(0))
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}" if not str(e).startswith("HTTP 4") else str(e)


# ---- the process's own figures -----------------------------------------------------------------------------------

def rss_mb() -> float:
    """Resident memory of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_fds() -> Optional[int]:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


# worker threads of the event loop's default executor (asyncio.to_thread) and of anyio's (starlette's threadpool):
# bounded pools that keep their threads once started, so they are counted apart
POOL_THREADS = ("asyncio_", "AnyIO worker thread")


def snapshot(engine) -> dict:
    from qwen2_pure.engine import Sequence
    from qwen2_pure.serve.engine import Request
    gc.collect()
    pool = engine.core.prefix_pool
    names = [t.name for t in threading.enumerate()]
    workers = sum(name.startswith(POOL_THREADS) for name in names)
    alive = [type(o) for o in gc.get_objects() if isinstance(o, (Request, Sequence))]
    return {"rss_mb": round(rss_mb(), 1), "fds": open_fds(), "threads": len(names) - workers,
            "pool_threads": workers, "live_requests": alive.count(Request), "live_sequences": alive.count(Sequence),
            "prefix_pool_mb": round(pool.nbytes / 2 ** 20, 2) if pool else 0.0,
            "prefix_pool_entries": len(pool) if pool else 0}


class Sampler:
    """RSS every `period` s in a thread: [(seconds since start, MB)]."""

    def __init__(self, period: float = 0.5):
        self.samples: list = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period):
        while not self._stop.wait(period):
            self.samples.append((round(time.monotonic() - self._t0, 1), round(rss_mb(), 1)))

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.samples


def slope_mb_per_min(samples: list) -> Optional[float]:
    """Least-squares trend of RSS over the second half of the soak (MB per minute): the first moments of load
    grow the allocator's arenas once; a leak goes on growing."""
    samples = samples[len(samples) // 2:]
    if len(samples) < 3:
        return None
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return round(60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx, 2) if sxx else None


def percentile(values: list, q: float) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 3)


def machine() -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


# ---- the run -------------------------------------------------------------------------------------------------------

class InProcessServer:
    """uvicorn serving `app` in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class ServerLog(logging.Handler):
    """The server's logged errors, counted by exception type, instead of printed (`with ServerLog() as log`)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.counts: dict = {}
        self.first: dict = {}
        self.logger = logging.getLogger("qwen2_pure.serve")

    def emit(self, record):
        kind = record.exc_info[0].__name__ if record.exc_info else "no exception"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        self.propagate, self.logger.propagate = self.logger.propagate, False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate


# A client that goes away while its body is being read makes the server log an internal error (and answer
# 500 to nobody); counted and reported, not a failure of the run. Any other logged error is one.
CLIENT_GONE = {"ClientDisconnect"}


def wait_idle(engine, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = engine.load()
        if load["running"] == 0 and load["waiting"] == 0 and not engine.core.rows:
            return True
        time.sleep(0.05)
    return False


def run(model_src: Optional[str] = None, *, seconds: float = 60, clients: int = 32, warmup: float = 10,
        slots: int = 16, seed: int = 0, rss_bound_mb: float = 64, tokenizer_dir: Optional[Path] = None,
        prompt_cache_mb: Optional[int] = None, log=print) -> dict:
    """The whole soak; returns the results (with "passed" and "failures")."""
    start = time.monotonic()
    import qwen2_pure
    from qwen2_pure.loading import resolve_source
    from qwen2_pure.serve.app import create_app

    with tempfile.TemporaryDirectory(prefix="qwen2pure-soak-") as tmp:
        if model_src is None:
            path = tiny_checkpoint(Path(tmp) / "tiny", tokenizer_dir)
            model_name = "tiny random Qwen2 (1 layer, hidden 32, the Qwen2.5 tokenizer)"
        else:
            path = resolve_source(model_src)
            model_name = str(model_src)
        loaded = qwen2_pure.load(path)
    model, tok = loaded.model, loaded.tokenizer
    log(f"[soak] model: {model_name} loaded in {time.monotonic() - start:.0f} s; computing the expected answers")
    goods = good_requests(model, tok)
    extra = {} if prompt_cache_mb is None else {"prompt_cache_mb": prompt_cache_mb}
    app = create_app(model, tok, slots=slots, max_seq_len=min(1024, model.config.max_position_embeddings), **extra)
    engine = app.state.engine
    failures: list[str] = []
    with ServerLog() as server_log:
        server = InProcessServer(app)
        try:
            kinds = dict(KINDS)
            client = Clients(server.port, goods, kinds)
            skipped = {}
            for kind in ("tools", "json_schema"):
                reason = probe(client, kind)
                if reason is not None:
                    skipped[kind] = reason
                    del kinds[kind]
                    log(f"[soak] skipping {kind}: {reason[:200]}")
                    if not reason.startswith("HTTP 4"):  # taken but answered wrongly: not a missing feature
                        failures.append(f"{kind}, first request: {reason[:300]}")
            log(f"[soak] warm-up: {clients} clients for {warmup:g} s")
            warm = client.run(clients, warmup, seed)
            if not wait_idle(engine, 60):
                failures.append("the engine was not idle after the warm-up")
            before = snapshot(engine)
            log(f"[soak] baseline {before}; soak: {clients} clients for {seconds:g} s")
            sampler = Sampler()
            t0 = time.monotonic()
            tally = client.run(clients, seconds, seed + 1)
            wall = time.monotonic() - t0
            idle = wait_idle(engine, 60)
            samples = sampler.stop()
            after = snapshot(engine)
            # the engine is idle before the web server has finished tearing down the last responses (a
            # disconnected stream's handler still holds its request for a moment): give them 10 s to go; a
            # leaked request stays and fails below
            deadline = time.monotonic() + 10
            while (after["live_requests"] or after["live_sequences"]) and time.monotonic() < deadline:
                time.sleep(0.2)
                after = snapshot(engine)
            core = engine.core
            state = {"idle": idle, "load": engine.load(), "rows": len(core.rows), "t": core.t,
                     "mask_sum": int(core.mask.sum()), "dead": engine.dead}
            health = Exchange(server.port, "GET", "/health")
            state["health"] = (health.status, health.json())
            health.close()
            try:  # one more good request, after everything
                client._good(goods[0], True)
                state["final_request"] = "ok"
            except Exception as e:
                state["final_request"] = f"{type(e).__name__}: {e}"
        finally:
            server.close()

    pool = engine.core.prefix_pool
    growth = after["rss_mb"] - before["rss_mb"]
    pool_growth = after["prefix_pool_mb"] - before["prefix_pool_mb"]
    failures += warm.errors[:20] + tally.errors[:50]
    if len(tally.errors) > 50:
        failures.append(f"... {len(tally.errors) - 50} more request errors")
    checks = [
        (idle and state["load"]["running"] == 0 and state["load"]["waiting"] == 0, "requests left running or waiting"),
        (state["rows"] == 0, f"{state['rows']} cache rows still taken"),
        (state["t"] == 0, f"the cache's time axis is at {state['t']}, not 0"),
        (state["mask_sum"] == 0, f"{state['mask_sum']} cache slots still marked in the mask"),
        (pool is None or pool.nbytes <= pool.max_bytes, "the prefix pool is over its budget"),
        (pool is None or pool.nbytes == sum(e.nbytes for e in pool.entries.values()), "the prefix pool's byte count "
                                                                                       "disagrees with its entries"),
        (after["fds"] is None or after["fds"] <= before["fds"], f"file descriptors {before['fds']} -> {after['fds']}"),
        (after["threads"] <= before["threads"], f"threads {before['threads']} -> {after['threads']}"),
        (after["live_requests"] == after["live_sequences"] == 0,
         f"{after['live_requests']} requests and {after['live_sequences']} sequences still alive"),
        (growth - max(pool_growth, 0) <= rss_bound_mb,
         f"RSS grew {growth:.1f} MB (prefix pool {pool_growth:+.1f} MB), over the bound of {rss_bound_mb} MB"),
        (state["health"][0] == 200 and state["health"][1].get("status") == "ok", f"/health: {state['health']}"),
        (state["final_request"] == "ok", f"the last greedy request: {state['final_request']}"),
        (state["dead"] is None, f"the engine died: {state['dead']}"),
        (all(tally.counts.get(k) for k in kinds), f"a kind was never drawn: {tally.counts}"),
    ] + [(False, f"the server logged {n} x {kind}: {server_log.first[kind][:200]}")
         for kind, n in server_log.counts.items() if kind not in CLIENT_GONE]
    failures += [why for ok, why in checks if not ok]
    lat = {k: {"n": len(v), "p50_s": percentile(v, 0.5), "p95_s": percentile(v, 0.95), "max_s": round(max(v), 3)}
           for k, v in sorted(tally.latency.items())}
    errors_by_kind = {}
    for e in tally.errors:
        kind = e.split(":", 1)[0]
        errors_by_kind[kind] = errors_by_kind.get(kind, 0) + 1
    result = {
        "passed": not failures, "failures": failures, "model": model_name, "machine": machine(),
        "config": {"seconds": seconds, "warmup_s": warmup, "clients": clients, "slots": slots, "seed": seed,
                   "prompt_cache_mb": pool.max_bytes >> 20 if pool else 0,
                   "kinds": kinds, "rss_bound_mb": rss_bound_mb, "good_prompts": len(goods)},
        "skipped_kinds": skipped, "wall_s": round(wall, 1),
        "requests": sum(tally.counts.values()), "requests_by_kind": dict(sorted(tally.counts.items())),
        "requests_per_s": round(sum(tally.counts.values()) / wall, 1),
        "errors": len(tally.errors), "errors_by_kind": errors_by_kind, "warmup_requests": sum(warm.counts.values()),
        "latency_s": lat, "ttft_s": {"p50": percentile(tally.ttft, 0.5), "p95": percentile(tally.ttft, 0.95)},
        "before": before, "after": after, "rss_growth_mb": round(growth, 1),
        "rss_peak_mb": max((s[1] for s in samples), default=None), "rss_slope_mb_per_min": slope_mb_per_min(samples),
        "rss_samples": samples, "engine_after": state,
        "engine_stats": engine.stats, "server_logged_errors": server_log.counts,
    }
    return result


def markdown(r: dict, command: str) -> str:
    m = r["machine"]
    lines = [f"`{command}` — {r['model']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), everything in one process.", "",
             f"**{'passed' if r['passed'] else 'FAILED'}**: {r['requests']} requests in {r['wall_s']} s "
             f"({r['requests_per_s']}/s) from {r['config']['clients']} clients over {r['config']['slots']} slots, "
             f"{r['errors']} errors; RSS {r['before']['rss_mb']} MB after the warm-up -> {r['after']['rss_mb']} MB "
             f"at the end ({r['rss_growth_mb']:+.1f} MB, bound {r['config']['rss_bound_mb']} MB; peak "
             f"{r['rss_peak_mb']} MB, trend over the second half {r['rss_slope_mb_per_min']} MB/min; prefix pool "
             f"{r['before']['prefix_pool_mb']} -> {r['after']['prefix_pool_mb']} MB); file descriptors "
             f"{r['before']['fds']} -> {r['after']['fds']}, threads {r['before']['threads']} -> "
             f"{r['after']['threads']} (executor pool workers {r['before']['pool_threads']} -> "
             f"{r['after']['pool_threads']}), {r['after']['live_requests']} request objects alive; afterwards "
             f"{r['engine_after']['rows']} rows taken, t = "
             f"{r['engine_after']['t']}, mask sum {r['engine_after']['mask_sum']}, /health "
             f"{r['engine_after']['health'][0]} {r['engine_after']['health'][1].get('status')}, a last greedy "
             f"request {r['engine_after']['final_request']}.", "",
             "| kind | requests | errors | p50 latency (s) | p95 latency (s) |", "| --- | ---: | ---: | ---: | ---: |"]
    for kind, lat in r["latency_s"].items():
        lines.append(f"| {kind} | {lat['n']} | {r['errors_by_kind'].get(kind, 0)} | {lat['p50_s']} | {lat['p95_s']} |")
    lines.append(f"\nTime to first token of the streamed answers: p50 {r['ttft_s']['p50']} s, "
                 f"p95 {r['ttft_s']['p95']} s.")
    for kind, n in r["server_logged_errors"].items():
        lines.append(f"The server logged {n} internal errors of type {kind}"
                     + (" (a client gone while its body was read)." if kind in CLIENT_GONE else "."))
    for kind, why in r["skipped_kinds"].items():
        lines.append(f"Skipped `{kind}`: {why[:160]}.")
    if r["failures"]:
        lines += ["", "Failures:"] + [f"- {f}" for f in r["failures"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder, .gguf or 'demo' (default: a tiny random model "
                                                  "with the demo's tokenizer)")
    ap.add_argument("--seconds", type=float, default=60, help="length of the soak (after the warm-up)")
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-bound-mb", type=float, default=64,
                    help="most RSS growth from the baseline to the end allowed, beyond the prefix pool's")
    ap.add_argument("--prompt-cache-mb", type=int, default=None, help="the server's prefix pool (default: its own)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_soak.json"))
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.clients < 1:
        ap.error("--seconds must be > 0, --warmup >= 0 and --clients >= 1")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    r = run(args.model, seconds=args.seconds, clients=args.clients, warmup=args.warmup, slots=args.slots,
            seed=args.seed, rss_bound_mb=args.rss_bound_mb, prompt_cache_mb=args.prompt_cache_mb, log=log)
    command = "python benchmarks/serve_soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    r["command"] = command.strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    print(markdown(r, r["command"]))
    log(f"[soak] results written to {args.out}")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
