"""LoRA SFT training speed and memory: qwen2-pure against transformers + peft, same checkpoint, data and config.

    python benchmarks/train.py                        # the demo model, fp32, r=8 on q_proj,v_proj, batch 2, cutoff 256
    python benchmarks/train.py --model DIR --dtype bfloat16 --lora-target all --steps 5 --repeats 3
    python benchmarks/train.py --smoke --out smoke.json  # a tiny random checkpoint, < 60 s

The demo dataset (data/) is encoded once with qwen2_pure's build_sft_data and collated with SFTCollator; the
same batches, in the same order, are fed to every engine. Each engine then does what the Trainer does per
optimizer step: forward, the summed next-token cross-entropy over the target tokens divided by their count,
backward, gradient clipping (max norm 1.0), AdamW step, zero_grad; bf16 runs under CPU autocast with fp32
LoRA weights (as the Trainer and transformers' Trainer with --bf16 do). Engines:

    qwen2-pure   qwen2_pure.load_model + lora.apply_lora (the Trainer's path)
    hf-sdpa      transformers AutoModelForCausalLM(attn_implementation="sdpa") + peft.get_peft_model
    hf-eager     the same with attn_implementation="eager"

Every (repeat, engine) run is its own subprocess, so peak memory does not mix: peak RSS = VmHWM at the end
minus VmRSS after the imports (the high-water mark is reset there when the kernel allows), so it covers the
model load and the training steps. Engines alternate inside each repeat so machine drift hits all alike.
Training tokens/s counts non-padding tokens (attention_mask sum) of the timed steps over their wall time;
warm-up steps are not timed. Medians (and min-max) over the repeats are printed as a markdown table, the
ratios ours/peer last, and the whole result is written as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("qwen2-pure", "hf-sdpa", "hf-eager")
ENGINE_LABEL = {"qwen2-pure": "qwen2-pure", "hf-sdpa": "transformers+peft (sdpa)",
                "hf-eager": "transformers+peft (eager)"}


# ---- memory ------------------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- the worker: one engine, one run -----------------------------------------------------------------------------

def worker(engine: str, spec_path: str) -> dict:
    import torch
    import torch.nn.functional as F
    if engine != "qwen2-pure":
        import peft
        import transformers
    else:  # the imports are part of the baseline, not of the engine's peak
        from qwen2_pure.lora import apply_lora
    spec = torch.load(spec_path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    _reset_peak()
    base_kb = _status_kb("VmRSS")
    dtype = getattr(torch, spec["dtype"])
    targets = spec["targets"]

    t0 = time.perf_counter()
    if engine == "qwen2-pure":
        import qwen2_pure as q
        from qwen2_pure.lora import apply_lora
        model = q.load_model(spec["model"], dtype=dtype)
        apply_lora(model, targets, r=spec["r"], alpha=spec["alpha"], dropout=0.0)
        forward = model  # model(input_ids, attention_mask=...) -> logits
    else:
        import peft
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            spec["model"], dtype=dtype, attn_implementation=engine.split("-", 1)[1])
        hf.config.use_cache = False
        model = peft.get_peft_model(hf, peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                                        target_modules=list(targets), task_type="CAUSAL_LM"))

        def forward(ids, attention_mask):
            return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    load_s = time.perf_counter() - t0
    load_kb = _status_kb("VmRSS")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step(batch):
        with autocast:
            logits = forward(batch["input_ids"], attention_mask=batch["attention_mask"])
            labels = batch["labels"][:, 1:]
            logits = logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")
        loss = loss / max(int((labels != -100).sum()), 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    batches = spec["batches"]
    warm, timed = batches[:spec["warmup"]], batches[spec["warmup"]:]
    for b in warm:
        step(b)
    times, losses = [], []
    for b in timed:
        t = time.perf_counter()
        losses.append(step(b))
        times.append(time.perf_counter() - t)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    return {"engine": engine, "load_s": load_s, "step_s": times, "tokens": tokens,
            "tokens_per_s": tokens / sum(times), "s_per_step": sum(times) / len(times), "losses": losses,
            "trainable_params": n_trainable, "peak_rss_mb": (_status_kb("VmHWM") - base_kb) / 1024,
            "load_rss_mb": (load_kb - base_kb) / 1024, "baseline_rss_mb": base_kb / 1024}


# ---- the driver --------------------------------------------------------------------------------------------------

def tiny_checkpoint(directory: Path, tokenizer_from: Path) -> Path:
    """A random 2-layer Qwen2 (hidden 32) with the real Qwen2.5 vocabulary and tokenizer files (tests' pattern)."""
    import shutil

    import torch
    import transformers
    cfg = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, directory / name)
    return directory


def make_batches(path, dataset: str, dataset_dir, cutoff: int, batch_size: int, count: int, seed: int) -> list:
    import torch

    import qwen2_pure as q
    from qwen2_pure.train.data import SFTCollator, build_sft_data, resolve_pad_token_id
    tok = q.load_tokenizer(path)
    data = build_sft_data(tok, dataset, dataset_dir, cutoff_len=cutoff, seed=seed)
    collate = SFTCollator(resolve_pad_token_id(tok))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    order = (order * (1 + count * batch_size // max(len(order), 1)))[:count * batch_size]
    return [collate([data.train[i] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(count)]


def run_worker(engine: str, spec_path: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--spec", spec_path],
                       capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{engine} worker failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    tps = [r["tokens_per_s"] for r in runs]
    sps = [r["s_per_step"] for r in runs]
    peak = [r["peak_rss_mb"] for r in runs]
    return {"engine": runs[0]["engine"], "label": ENGINE_LABEL[runs[0]["engine"]],
            "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)],
            "s_per_step": statistics.median(sps), "s_per_step_range": [min(sps), max(sps)],
            "peak_rss_mb": statistics.median(peak), "peak_rss_mb_range": [min(peak), max(peak)],
            "load_rss_mb": statistics.median(r["load_rss_mb"] for r in runs),
            "load_s": statistics.median(r["load_s"] for r in runs),
            "trainable_params": runs[0]["trainable_params"], "first_loss": runs[0]["losses"][0], "runs": runs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the demo checkpoint; with --smoke: a "
                                                  "tiny random checkpoint using the demo tokenizer)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lora-target", default="q_proj,v_proj", help='comma list of module names, or "all"')
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--dataset", default="qwen2_pure_demo")
    ap.add_argument("--dataset-dir", default=str(ROOT / "data"))
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--smoke", action="store_true", help="a tiny quick run: cutoff 64, 2 timed steps, 1 repeat")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per engine run")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.spec)))
        return

    import torch

    import qwen2_pure as q
    from qwen2_pure.lora import _resolve_targets
    threads = args.threads or torch.get_num_threads()
    if args.smoke:
        args.cutoff, args.steps, args.warmup, args.repeats = min(args.cutoff, 64), 2, 1, 1
    targets = _resolve_targets(args.lora_target)
    if isinstance(targets, str):
        raise SystemExit(f"--lora-target {args.lora_target!r}: give module names (comma list) or 'all'")
    with tempfile.TemporaryDirectory(prefix="qwen2pure-train-bench-") as tmp:
        if args.smoke and args.model is None:
            from qwen2_pure.loading.demo import demo_model_dir  # the tokenizer files of the demo's folder
            path = tiny_checkpoint(Path(tmp) / "tiny", demo_model_dir())
        else:
            path = q.loading.resolve_source(args.model)
        batches = make_batches(path, args.dataset, args.dataset_dir, args.cutoff, args.batch_size,
                               args.warmup + args.steps, args.seed)
        spec = {"model": str(path), "dtype": args.dtype, "targets": list(targets), "r": args.lora_rank,
                "alpha": args.lora_alpha, "threads": threads, "warmup": args.warmup, "batches": batches}
        spec_path = str(Path(tmp) / "spec.pt")
        torch.save(spec, spec_path)
        runs = {e: [] for e in args.engines}
        for r in range(args.repeats):
            for e in args.engines:  # alternate engines inside each repeat
                res = run_worker(e, spec_path, args.timeout)
                runs[e].append(res)
                print(f"[repeat {r + 1}/{args.repeats}] {e}: {res['tokens_per_s']:.1f} tok/s, "
                      f"{res['s_per_step']:.3f} s/step, peak RSS {res['peak_rss_mb']:.0f} MiB, "
                      f"loss {res['losses'][0]:.4f}", file=sys.stderr, flush=True)
    results = [summarize(runs[e]) for e in args.engines]
    timed = batches[args.warmup:]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "model": str(path) if not (args.smoke and args.model is None) else "tiny random (smoke)",
            "dtype": args.dtype, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
            "lora_target": list(targets), "batch_size": args.batch_size, "cutoff": args.cutoff,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "tokens_per_run": sum(int(b["attention_mask"].sum()) for b in timed),
            "padded_tokens_per_run": sum(b["attention_mask"].numel() for b in timed),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        import peft
        import transformers
        meta["transformers"], meta["peft"] = transformers.__version__, peft.__version__
    except ImportError:
        pass
    print(f"\n{meta['date']}, {threads} threads, torch {torch.__version__}, transformers "
          f"{meta.get('transformers')}, peft {meta.get('peft')}, {Path(meta['model']).name}, {args.dtype}, "
          f"LoRA r={args.lora_rank} alpha={args.lora_alpha:g} on {','.join(targets)}, batch {args.batch_size}, "
          f"cutoff {args.cutoff}, {args.steps} timed steps after {args.warmup} warm-up "
          f"({meta['tokens_per_run']} tokens), medians of {args.repeats}\n")
    print("| engine | train tok/s (min–max) | s/step | peak RSS MiB (min–max) | RSS after load MiB | trainable |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["tokens_per_s_range"]
        plo, phi = r["peak_rss_mb_range"]
        print(f"| {r['label']} | {r['tokens_per_s']:.1f} ({lo:.1f}–{hi:.1f}) | {r['s_per_step']:.3f} | "
              f"{r['peak_rss_mb']:.0f} ({plo:.0f}–{phi:.0f}) | {r['load_rss_mb']:.0f} | {r['trainable_params']:,} |")
    by = {r["engine"]: r for r in results}
    ratios = {}
    if "qwen2-pure" in by:
        print()
        ours = by["qwen2-pure"]
        for e in args.engines:
            if e != "qwen2-pure":
                ratios[e] = {"tokens_per_s": ours["tokens_per_s"] / by[e]["tokens_per_s"],
                             "peak_rss": ours["peak_rss_mb"] / max(by[e]["peak_rss_mb"], 1e-9)}
                print(f"ours/{ENGINE_LABEL[e]}: tokens/s {ratios[e]['tokens_per_s']:.2f}x, "
                      f"peak RSS {ratios[e]['peak_rss']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
