"""Throughput of `qwen2-pure serve` with 1, 4 and 16 concurrent streaming clients.

    python benchmarks/serve_throughput.py                          # the demo model, started here on the CPU
    python benchmarks/serve_throughput.py --model DIR --clients 1 4 16 --max-tokens 64 --out artifacts/serve.json
    python benchmarks/serve_throughput.py --url http://127.0.0.1:8000   # a server that is already running

Each round starts N clients at once; each sends one streaming chat request (a different question each, the
same answer length: `max_tokens` with ignore_eos, so every request generates exactly that many tokens) and
reads the stream to the end. Reported per round: aggregate tokens/s = all generated tokens / wall time from
the first request to the last [DONE] (prefills included), the time to first token (median and max), and
each client's own decode rate after its first token (median). The server runs as a subprocess (`qwen2-pure
serve`), so the clients do not share its interpreter. Standard library only on the client side.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

QUESTIONS = [
    "What is a KV cache?", "Explain grouped-query attention.", "Write a haiku about Python.",
    "What does RoPE do?", "Name three sorting algorithms.", "Why is the sky blue?", "What is a transformer?",
    "Give me a tip for writing tests.", "What is continuous batching?", "How does top-p sampling work?",
    "Describe the Qwen2 architecture.", "What is SwiGLU?", "What is RMSNorm?", "Explain softmax.",
    "What is a tokenizer?", "Summarize the idea of attention.",
]


def stream_one(url: str, body: dict, out: dict, start: threading.Barrier) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start.wait()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens = None, 0
    while line := resp.readline():
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    conn.close()
    out.update(start=t0, first=first or end, end=end, tokens=tokens)


def run_round(url: str, model: str, clients: int, max_tokens: int) -> dict:
    results = [dict() for _ in range(clients)]
    barrier = threading.Barrier(clients)
    threads = []
    for i in range(clients):
        body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        threads.append(threading.Thread(target=stream_one, args=(url, body, results[i], barrier)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any("tokens" not in r for r in results):
        raise RuntimeError("a client failed (see the traceback above)")
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["first"] - r["start"] for r in results]
    # a client's decode rate needs a second token after a measurable time; otherwise it has none (not 0 or inf)
    decode = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in results if r["tokens"] > 1 and r["end"] > r["first"]]
    return {"clients": clients, "tokens": tokens, "wall_s": round(end - start, 2),
            "aggregate_tok_s": round(tokens / (end - start), 2),
            "ttft_median_s": round(statistics.median(ttft), 2), "ttft_max_s": round(max(ttft), 2),
            "per_client_decode_tok_s_median": round(statistics.median(decode), 2) if decode else None}


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "qwen2_pure.cli", "serve", "--port", "0", "--log-level", "info",
           "--slots", str(max(args.clients)), "--dtype", args.dtype]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server exited:\n" + "".join(lines))
        lines.append(line)
        sys.stderr.write(line)
        m = re.search(r"Uvicorn running on (http://\S+:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain its logs
            return proc, m.group(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder or .gguf (default: the demo model)")
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        conn.close()
        run_round(url, model, 1, 4)  # warm-up
        rounds = []
        for n in args.clients:
            r = run_round(url, model, n, args.max_tokens)
            rounds.append(r)
            print(f"{n:>3} clients: {r['aggregate_tok_s']:7.2f} tok/s aggregate  ({r['tokens']} tokens in "
                  f"{r['wall_s']} s; TTFT median {r['ttft_median_s']} s, max {r['ttft_max_s']} s; "
                  f"per-client decode {r['per_client_decode_tok_s_median']} tok/s)", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    report = {"model": model, "url": url if args.url else "(started here)", "max_tokens": args.max_tokens,
              "dtype": args.dtype, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "date": time.strftime("%Y-%m-%d"), "rounds": rounds}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
