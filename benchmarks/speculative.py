"""Speculative decoding on a code edit: plain greedy decoding against prompt lookup (and a draft model).

    python benchmarks/speculative.py [--model SRC] [--dtype float32] [--threads 2] [--max-new-tokens 160]
                                     [--lookup 3 5 10] [--draft SRC --draft-tokens 3 5] [--repeats 3]

The prompt asks the model (chat template, greedy) to rewrite a 30-line Python function with one small change
("add a timeout argument"), so most of the answer copies the prompt: prompt lookup's best case, and the
everyday case of an editor assistant. Each variant runs the same engine (`qwen2_pure.engine.Engine`, one
sequence) and must produce the same tokens as plain greedy decoding; the variants are interleaved, repeat by
repeat, so that drift in the machine's load hits them alike. Reported per variant, medians of `--repeats`:
decode tokens/s (the tokens after the first, over the time after the prefill), the acceptance rate (accepted
guesses / proposed guesses) and tokens per target forward. Writes --out (JSON) and --plot (PNG), and prints a
markdown table with the machine's CPU (/proc/cpuinfo's model name, as lscpu shows it) and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import qwen2_pure as q
from prompt_cache import cpu_name  # benchmarks/prompt_cache.py
from qwen2_pure.engine import Engine, Sequence
from qwen2_pure.speculative import DraftModel, PromptLookup

HERE = Path(__file__).resolve().parent

CODE = '''\
def fetch_all(session, urls, retries=3, backoff=0.5):
    """Fetch every URL with `session`; retry failed requests with exponential backoff."""
    results = {}
    errors = {}
    for url in urls:
        delay = backoff
        for attempt in range(retries + 1):
            try:
                response = session.get(url)
                response.raise_for_status()
                results[url] = response.json()
                break
            except requests.HTTPError as e:
                if e.response is not None and e.response.status_code < 500:
                    errors[url] = str(e)
                    break
                if attempt == retries:
                    errors[url] = str(e)
                else:
                    time.sleep(delay)
                    delay *= 2
            except requests.ConnectionError as e:
                if attempt == retries:
                    errors[url] = str(e)
                else:
                    time.sleep(delay)
                    delay *= 2
    return results, errors
'''

REQUEST = ("Rewrite this function so that it also takes a `timeout` argument (default 10 seconds) and passes it "
           "to every `session.get` call. Keep everything else exactly the same and answer with the whole "
           "function only.\n\n```python\n" + CODE + "```")


def run(model, prompt: list[int], speculator, max_new_tokens: int) -> dict:
    engine = Engine(model, max_batch=1, max_seq_len=len(prompt) + max_new_tokens, speculator=speculator)
    seq = Sequence(prompt=prompt, max_new_tokens=max_new_tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        engine.add([seq])
        t1 = time.perf_counter()
        while engine.rows:
            engine.step()
        t2 = time.perf_counter()
    s = engine.stats
    return {"tokens": list(seq.tokens), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tok_s": (len(seq.tokens) - 1) / (t2 - t1), "target_forwards": s["steps"],
            "proposed": s.get("spec_proposed", 0), "accepted": s.get("spec_accepted", 0)}


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["variants"])
    rates = [result["variants"][n]["decode_tok_s"]["median"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(names)), 4.2))
    bars = ax.bar(names, rates, color=["#888"] + ["#3a7"] * (len(names) - 1))
    for bar, n in zip(bars, names):
        v = result["variants"][n]
        label = f"{v['decode_tok_s']['median']:.2f}"
        if v["acceptance"] is not None:
            label += f"\naccept {v['acceptance']:.0%}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_ylim(0, max(rates) * 1.25)
    ax.set_title(f"{result['model']} {result['dtype']}, code edit, greedy, {result['tokens']} tokens\n"
                 f"{result['machine']}, {_threads(result['threads'])}, load average "
                 f"{result['load_average_1min'][0]:.1f}-{result['load_average_1min'][1]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the demo model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--lookup", type=int, nargs="*", default=[3, 5, 10], help="prompt_lookup_num_tokens values")
    ap.add_argument("--draft", default=None, help="a draft model (folder, .gguf, or 'demo')")
    ap.add_argument("--draft-tokens", type=int, nargs="*", default=[3, 5], help="num_assistant_tokens values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "speculative.json"))
    ap.add_argument("--plot", default=str(HERE / "results" / "speculative.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = q.load(args.model, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": REQUEST}], add_generation_prompt=True))
    variants = {"plain": lambda: None}
    for n in args.lookup:
        variants[f"lookup {n}"] = lambda n=n: PromptLookup(n)
    if args.draft:
        draft = q.load(args.draft, dtype=args.dtype, tokenizer=False).model
        for n in args.draft_tokens:
            variants[f"draft {n}"] = lambda n=n: DraftModel(draft, n)
    run(model, prompt[:32], None, 4)  # warm-up (allocator, lazy inits)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.repeats):  # interleaved
        for name, make in variants.items():
            out = run(model, prompt, make(), args.max_new_tokens)
            runs[name].append(out)
            print(f"repeat {r + 1} {name}: {out['decode_tok_s']:.2f} tok/s", flush=True)
    load_after = os.getloadavg()
    reference = runs["plain"][0]["tokens"]
    for name, rs in runs.items():
        for out in rs:
            assert out["tokens"] == reference, f"{name} did not reproduce plain greedy's tokens"
    result = {"machine": cpu_name(), "threads": args.threads, "torch": torch.__version__, "model": loaded.name,
              "dtype": args.dtype, "draft": args.draft, "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
              "prompt_tokens": len(prompt), "tokens": len(reference),
              "load_average_1min": [load_before[0], load_after[0]],
              "answer": tok.decode(reference, skip_special_tokens=True), "variants": {}}
    plain = statistics.median(o["decode_tok_s"] for o in runs["plain"])
    for name, rs in runs.items():
        rates = [o["decode_tok_s"] for o in rs]
        proposed, accepted = rs[0]["proposed"], rs[0]["accepted"]  # greedy: the same in every repeat
        result["variants"][name] = {
            "decode_tok_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
            "speedup": statistics.median(rates) / plain,
            "prefill_s": statistics.median(o["prefill_s"] for o in rs),
            "target_forwards": rs[0]["target_forwards"], "proposed": proposed, "accepted": accepted,
            "acceptance": accepted / proposed if proposed else None,
            "tokens_per_forward": (len(reference) - 1) / rs[0]["target_forwards"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(f"\n{result['machine']}, {_threads(args.threads)}, {loaded.name} {args.dtype}, {len(prompt)}-token prompt, "
          f"{len(reference)} tokens, medians of {args.repeats}, load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}\n")
    print("| variant | decode tok/s (min-max) | speedup | acceptance | tokens per target forward |")
    print("|---|---|---|---|---|")
    for name, v in result["variants"].items():
        acc = "-" if v["acceptance"] is None else f"{v['acceptance']:.0%} ({v['accepted']}/{v['proposed']})"
        d = v["decode_tok_s"]
        print(f"| {name} | {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | {v['speedup']:.2f}x | {acc} | "
              f"{v['tokens_per_forward']:.2f} |")


if __name__ == "__main__":
    main()
