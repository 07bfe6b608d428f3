"""Quality of the weight-only quantized models against the bf16 one: perplexity and top-1 agreement.

    python tools/quant_quality.py                          # the demo model: bfloat16, int8, int4
    python tools/quant_quality.py --model DIR --modes int8 int4 --steps 256 --out artifacts/quant.json

- Perplexity of each model on a fixed text (benchmarks/data/perplexity_text.md: a frozen copy of the
  project's README, so the figure does not move when the README does; its sha256 and token count are
  printed), in windows of --window tokens, every token but each window's first scored.
- Top-1 agreement: the bf16 model answers a fixed chat prompt greedily for --steps tokens; each quantized
  model reads the same prompt + answer (teacher forcing) and we count the steps where its most likely token
  is the bf16 model's. Also reported: how many greedy tokens it generates identically before the first
  difference (free running).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import qwen2_pure as q

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("Write a Python function `merge_sorted(a, b)` that merges two sorted lists in linear time, "
          "then explain how it works and test it on a few inputs.")


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int, label: str) -> float:
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, window), desc=f"perplexity {label}", file=sys.stderr, leave=False):
        chunk = torch.tensor([ids[start:start + window]])
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll += float(loss)
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.inference_mode()
def agreement(model, prompt: list[int], answer: list[int]) -> float:
    seq = torch.tensor([prompt + answer])
    logits = model(seq).float()[0, len(prompt) - 1:-1]  # the prediction of each answer token
    return float((logits.argmax(-1) == torch.tensor(answer)).float().mean())


def llama_perplexity(gguf: str, ids: list[int], window: int, threads) -> float:
    """The same windows through llama.cpp (llama-cpp-python), for its own quantizations' figures."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=window, n_batch=window, logits_all=True, verbose=False,
                n_threads=threads or torch.get_num_threads())
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, window), desc=f"perplexity {Path(gguf).name}", file=sys.stderr,
                      leave=False):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the demo checkpoint)")
    ap.add_argument("--reference", default="bfloat16", help="dtype of the reference model (default bfloat16)")
    ap.add_argument("--modes", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    ap.add_argument("--text", default=str(ROOT / "benchmarks" / "data" / "perplexity_text.md"),
                    help="text for the perplexity (default: benchmarks/data/perplexity_text.md)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=256, help="greedy steps for the top-1 agreement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama-gguf", nargs="*", default=[], metavar="NAME=FILE",
                    help="also the perplexity of these GGUFs through llama.cpp (e.g. bf16=... q4_k_m=..., the files "
                         "benchmarks/gguf_peers.py makes): llama.cpp's own quantization loss on the same text")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = q.load_tokenizer(args.model)
    raw = Path(args.text).read_bytes()
    text_ids = tok.encode(raw.decode("utf-8"))
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True))
    print(f"text: {args.text} (sha256 {hashlib.sha256(raw).hexdigest()[:12]}, {len(text_ids)} tokens)", file=sys.stderr)

    ref = q.load_model(args.model, dtype=args.reference)
    t0 = time.perf_counter()
    [answer] = q.generate(ref, [prompt], max_new_tokens=args.steps, stop_token_ids=[])
    print(f"reference answer: {len(answer)} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = [{"model": args.reference, "perplexity": perplexity(ref, text_ids, args.window, args.reference),
             "top1_agreement": agreement(ref, prompt, answer), "identical_greedy_prefix": len(answer)}]
    del ref
    for mode in args.modes:
        t0 = time.perf_counter()
        model = q.load_model(args.model, dtype=args.reference, quantize=mode)
        load_s = time.perf_counter() - t0
        [free] = q.generate(model, [prompt], max_new_tokens=args.steps, stop_token_ids=[])
        same = next((i for i, (a, b) in enumerate(zip(free, answer)) if a != b), len(answer))
        rows.append({"model": f"{mode} ({args.reference} activations)", "load_s": load_s,
                     "perplexity": perplexity(model, text_ids, args.window, mode),
                     "top1_agreement": agreement(model, prompt, answer), "identical_greedy_prefix": same})
        del model
    llama_rows = []
    for spec in args.llama_gguf:
        name, _, file = spec.partition("=")
        llama_rows.append({"model": f"llama.cpp {name}", "perplexity": llama_perplexity(file, text_ids, args.window,
                                                                                       args.threads)})
    base = rows[0]["perplexity"]
    print(f"\n{len(text_ids)}-token text ({Path(args.text).name}), windows of {args.window}; "
          f"{args.steps} greedy steps of the {args.reference} model\n")
    print("| model | perplexity | vs reference | top-1 agreement | identical greedy prefix |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
              f"{100 * r['top1_agreement']:.1f}% | {r['identical_greedy_prefix']} / {len(answer)} |")
    if llama_rows:
        print("\n| llama.cpp | perplexity | vs the first |\n|---|---|---|")
        for r in llama_rows:
            print(f"| {r['model']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / llama_rows[0]['perplexity'] - 1):+.2f}% |")
    rows += llama_rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "torch": torch.__version__,
            "text": args.text, "text_sha256": hashlib.sha256(raw).hexdigest(), "text_tokens": len(text_ids),
            "window": args.window, "steps": len(answer), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
