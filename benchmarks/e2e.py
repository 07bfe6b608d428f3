"""End-to-end CPU speed: qwen2-pure against transformers on the same checkpoint, prompt and threads.

    python benchmarks/e2e.py                       # the demo model, 512-token prompt, 128 new tokens
    python benchmarks/e2e.py --model DIR --dtypes float32 bfloat16 --repeats 3 --threads 2

Both engines are measured the same way, alternating within each repeat so drift hits both alike:
time to first token (TTFT) = a generate() of one token (prefill + one sampling step), and decode
tok/s = (N - 1) / (time of a generate() of N tokens - TTFT). Greedy, no early stop. Medians and
min/max of the repeats are printed as a markdown table, ratios ours/transformers last, and written
as JSON next to the table when --out is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import qwen2_pure as q  # the installed package (pip install -e .)


def prompt_ids(tok, n: int) -> list[int]:
    """n tokens of real text (the project's README, repeated) so the prompt is not degenerate."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    ids = tok.encode(text)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Ours:
    name = "qwen2-pure"

    def __init__(self, path, dtype):
        self.model = q.load_model(path, dtype=dtype)

    def run(self, ids, n):
        q.generate(self.model, [ids], max_new_tokens=n, stop_token_ids=[])


class Transformers:
    name = "transformers"

    def __init__(self, path, dtype):
        import transformers
        self.version = transformers.__version__
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def run(self, ids, n):
        x = torch.tensor([ids])
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, top_k=None, top_p=None, temperature=None, pad_token_id=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the demo checkpoint)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--engines", nargs="+", default=["qwen2-pure", "transformers"])
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = q.loading.resolve_source(args.model)
    ids = prompt_ids(q.load_tokenizer(path), args.prompt_tokens)
    engines = {"qwen2-pure": Ours, "transformers": Transformers}
    results = []
    for dtype in args.dtypes:
        loaded = []
        for name in args.engines:
            t0 = time.perf_counter()
            eng = engines[name](path, getattr(torch, dtype))
            eng.load_s = time.perf_counter() - t0
            eng.run(ids[:16], 2)  # warm-up
            loaded.append(eng)
        samples = {e.name: {"ttft": [], "decode": []} for e in loaded}
        for r in range(args.repeats):
            for e in loaded:  # alternate engines inside each repeat
                ttft = time_call(lambda: e.run(ids, 1))
                total = time_call(lambda: e.run(ids, args.new_tokens))
                samples[e.name]["ttft"].append(ttft)
                samples[e.name]["decode"].append((args.new_tokens - 1) / (total - ttft))
                print(f"[{dtype} repeat {r + 1}/{args.repeats}] {e.name}: TTFT {ttft:.3f} s, "
                      f"decode {samples[e.name]['decode'][-1]:.2f} tok/s", file=sys.stderr, flush=True)
        for e in loaded:
            s = samples[e.name]
            ttft = statistics.median(s["ttft"])
            results.append({
                "engine": e.name, "dtype": dtype, "load_s": e.load_s, "ttft_s": ttft,
                "prefill_tok_s": args.prompt_tokens / ttft,
                "prefill_tok_s_range": [args.prompt_tokens / max(s["ttft"]), args.prompt_tokens / min(s["ttft"])],
                "decode_tok_s": statistics.median(s["decode"]),
                "decode_tok_s_range": [min(s["decode"]), max(s["decode"])],
            })
        del loaded
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpu_count": torch.get_num_threads(), "threads": args.threads, "torch": torch.__version__,
            "model": str(path), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "command": " ".join(sys.argv)}
    print(f"\n{meta['date']}, {args.threads} threads, torch {torch.__version__}, {path.name}, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, medians of {args.repeats}\n")
    print("| engine | dtype | prefill tok/s (min–max) | TTFT s | decode tok/s (min–max) | load s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["prefill_tok_s_range"]
        dlo, dhi = r["decode_tok_s_range"]
        print(f"| {r['engine']} | {r['dtype']} | {r['prefill_tok_s']:.0f} ({lo:.0f}–{hi:.0f}) | {r['ttft_s']:.2f} | "
              f"{r['decode_tok_s']:.2f} ({dlo:.2f}–{dhi:.2f}) | {r['load_s']:.1f} |")
    by = {(r["engine"], r["dtype"]): r for r in results}
    print()
    for dtype in args.dtypes:
        a, b = by.get(("qwen2-pure", dtype)), by.get(("transformers", dtype))
        if a and b:
            print(f"ours/transformers {dtype}: prefill {a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x, "
                  f"decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
