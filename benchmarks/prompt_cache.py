"""Time to first token of a chat's 10th turn with a prompt cache, against a cold prefill of the whole history.

    python benchmarks/prompt_cache.py [--model SRC] [--dtype float32] [--threads 2] [--history 2000] [--repeats 5]

A conversation of 9 turns (user questions and assistant answers cut from benchmarks/data/perplexity_text.md)
is rendered with the model's chat template to about `--history` tokens. Measured, each the median of
`--repeats` runs, the engine timed from the call to the first token:
- turn 1: the first turn's prompt (system + first question), nothing cached;
- turn 10 cold: the 10th turn's whole prompt (history + question) prefilled from scratch;
- turn 10 cached: the same prompt with a PromptCache holding the history (what the chat command keeps from
  turn to turn: the 9th turn's prompt and answer), so only the new tokens are prefilled;
- new tokens alone: a fresh prompt as long as what turn 10 adds, nothing cached (the target: turn 10 cached is
  within 1.2x of this).
Writes benchmarks/results/prompt_cache.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import qwen2_pure as q

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def conversation(tok, history_tokens: int) -> tuple[list[dict], str]:
    """9 turns of (question, answer) pairs cut from the project's fixed text, about `history_tokens` long, and
    a 10th question."""
    text = (HERE / "data" / "perplexity_text.md").read_text()
    words = text.split()
    per_word = len(tok.encode(text)) / len(words)  # tokens per word of this text
    per_turn = max(8, int((history_tokens - 9 * 12) / 9 / per_word))  # ~12 tokens of template per turn
    messages, i = [{"role": "system", "content": "You are a helpful assistant."}], 0
    for turn in range(9):
        q_len = per_turn // 4
        question = " ".join(words[i:i + q_len]) + "?"
        answer = " ".join(words[i + q_len:i + per_turn])
        i = (i + per_turn) % max(1, len(words) - per_turn)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages, "Summarize what we discussed in two sentences."


def ttft(model, prompt, cache=None) -> float:
    t0 = time.perf_counter()
    next(iter(q.stream_generate(model, [prompt], max_new_tokens=1, stop_token_ids=[], prompt_cache=cache)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the demo model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history", type=int, default=2000, help="tokens of history before turn 10")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "prompt_cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = q.load(args.model, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    messages, question = conversation(tok, args.history)
    history = tok.encode(tok.apply_chat_template(messages))  # turns 1-9, answers closed by <|im_end|>
    turn10 = tok.encode(tok.apply_chat_template(messages + [{"role": "user", "content": question}],
                                                add_generation_prompt=True))
    turn1 = tok.encode(tok.apply_chat_template(messages[:2], add_generation_prompt=True))
    new = len(turn10) - len(history)
    alone = turn10[-new:]  # a fresh prompt of the same length as what turn 10 adds
    ttft(model, turn1)  # warm-up (allocator, lazy inits)

    def cached_run() -> float:
        cache = q.PromptCache()
        q.generate(model, [history], max_new_tokens=1, stop_token_ids=[], prompt_cache=cache)  # not timed
        return ttft(model, turn10, cache)

    runs = {"turn 1": [], "turn 10 cold": [], "turn 10 cached": [], "new tokens alone": []}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        runs["turn 1"].append(ttft(model, turn1))
        runs["turn 10 cold"].append(ttft(model, turn10))
        runs["turn 10 cached"].append(cached_run())
        runs["new tokens alone"].append(ttft(model, alone))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "machine": cpu_name(), "threads": args.threads, "torch": torch.__version__, "model": loaded.name,
        "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
        "tokens": {"turn 1": len(turn1), "history": len(history), "turn 10": len(turn10), "new in turn 10": new},
        "ttft_s": {k: {"median": m, "min": min(runs[k]), "max": max(runs[k])} for k, m in med.items()},
        "ratios": {"turn 10 cached / new tokens alone": med["turn 10 cached"] / med["new tokens alone"],
                   "turn 10 cold / turn 10 cached": med["turn 10 cold"] / med["turn 10 cached"],
                   "turn 10 cached / turn 1": med["turn 10 cached"] / med["turn 1"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}, {args.threads} threads, {loaded.name} {args.dtype}, medians of {args.repeats}\n")
    print("| prompt | tokens prefilled | TTFT (s) |\n|---|---|---|")
    prefilled = {"turn 1": len(turn1), "turn 10 cold": len(turn10), "turn 10 cached": new, "new tokens alone": new}
    for k, m in med.items():
        print(f"| {k} | {prefilled[k]} | {m:.3f} ({min(runs[k]):.3f}-{max(runs[k]):.3f}) |")
    print()
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":
    main()
