"""The whole model on one CUDA GPU, in one run of under 8 minutes: every figure from the same card.

    python benchmarks/gpu_e2e.py [--out benchmarks/results] [--budget-s 450]

Sections (each time-boxed; a failure is recorded in the JSON and the rest continue):
  bandwidth  copy of a 2 GiB buffer (read + write bytes), the roofline's denominator
  e2e        prefill tok/s, decode tok/s, TTFT, peak memory (torch.cuda.max_memory_allocated) for ours eager,
             ours compile=True (CUDA-graph decode) and transformers (SDPA; flash_attention_2 if importable), on the
             demo model (qwen2_pure.load(None), bf16) and a Qwen2.5-7B-shaped model with random weights made on the
             GPU (bf16), batch 1 and 16, 512-token prompt, 256 new tokens; decode as % of the HBM roofline
             (weights + KV bytes per step / copy bandwidth)
  parity     greedy tokens, ours vs transformers, demo model in fp32 on the GPU (and bf16: first divergence)
  decode     the decode kernel at 7B / 72B GQA shapes and MHA, B*S >= 64K, % of copy bandwidth
  lora       LoRA SFT steps (bf16; fp16 with GradScaler), tokens/s and peak memory; transformers + peft if installed
Writes OUT/gpu_e2e.json and OUT/gpu_e2e.png. Without CUDA it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

NO_CUDA_EXIT = 2
PROMPT, NEW = 512, 256


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    def fire(*_):
        raise SectionTimeout(f"time box of {seconds:.0f} s exceeded")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def copy_bandwidth() -> dict:
    n = 2 * 2 ** 30 // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(sync_time(lambda: b.copy_(a)) for _ in range(10))
    return {"bytes": 2 * a.numel() * 4, "seconds": best, "GBps": 2 * a.numel() * 4 / best / 1e9}


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(cfg, dtype) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


def random_7b(dtype):
    from qwen2_pure import Qwen2Config, Qwen2ForCausalLM
    from qwen2_pure.presets import PRESETS
    from qwen2_pure.settings import Settings
    cfg = Qwen2Config.from_dict({k: v for k, v in PRESETS["Qwen2.5-7B"].items() if not k.startswith("_")})
    with torch.device("cuda"):
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval().requires_grad_(False), cfg


def ours_run(model, ids: torch.Tensor, n: int):
    from qwen2_pure import generate
    return generate(model, ids.tolist(), max_new_tokens=n, stop_token_ids=[])


def measure(run, ids, cfg, weight_bytes, dtype, bw) -> dict:
    """TTFT = a 1-token generation; decode tok/s = B * (NEW - 1) / (t(NEW) - TTFT)."""
    B = ids.shape[0]
    run(ids, 2)  # warm-up: compiles, captures the graph, tunes the kernels
    torch.cuda.reset_peak_memory_stats()
    ttft = min(sync_time(lambda: run(ids, 1)) for _ in range(2))
    total = sync_time(lambda: run(ids, NEW))
    step = (total - ttft) / (NEW - 1)
    kv = kv_bytes_per_token(cfg, dtype) * B * (PROMPT + NEW / 2)  # the mean cache read per step
    roofline_step = (weight_bytes + kv) / (bw * 1e9)
    return {"batch": B, "ttft_s": ttft, "prefill_tok_s": B * PROMPT / ttft, "decode_tok_s": B / step,
            "decode_step_s": step, "roofline_step_s": roofline_step, "pct_roofline": 100 * roofline_step / step,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2 ** 30}


def hf_from_ours(model, cfg, dtype, attn):
    import transformers
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_dict().items()} if hasattr(cfg, "to_dict")
                                      else vars(cfg))
    hf = transformers.Qwen2ForCausalLM._from_config(hf_cfg, attn_implementation=attn, torch_dtype=dtype).cuda()
    missing = hf.load_state_dict(model.state_dict(), strict=False)
    return hf.eval(), missing


def hf_run(hf):
    def run(ids, n):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
    return run


def section_e2e(res, bw, deadline):
    import qwen2_pure
    rows = []
    for name, dtype in (("demo", torch.bfloat16), ("Qwen2.5-7B-random", torch.bfloat16)):
        for compile_ in (False, True):
            if time.time() > deadline:
                rows.append({"model": name, "skipped": "out of time"})
                continue
            try:
                if name == "demo":
                    model = qwen2_pure.load(None, dtype=dtype, device="cuda", compile=compile_, tokenizer=False).model
                    cfg = model.config
                else:
                    model, cfg = random_7b(dtype)
                    if compile_:
                        model.configure(qwen2_pure.Settings(compile=True))
                wb = model_bytes(model)
                for B in (1, 16):
                    ids = torch.randint(0, cfg.vocab_size, (B, PROMPT), device="cuda")
                    r = measure(lambda x, n: ours_run(model, x, n), ids, cfg, wb, dtype, bw)
                    rows.append({"model": name, "engine": "ours+compile" if compile_ else "ours", **r})
                    print(json.dumps(rows[-1]), flush=True)
                    for attn in ("sdpa", "flash_attention_2") if not compile_ else ():
                        try:
                            hf, _ = hf_from_ours(model, cfg, dtype, attn)
                            r = measure(hf_run(hf), ids, cfg, wb, dtype, bw)
                            rows.append({"model": name, "engine": f"transformers+{attn}", **r})
                            print(json.dumps(rows[-1]), flush=True)
                            del hf
                        except Exception as e:  # flash_attention_2 not installed, ...
                            rows.append({"model": name, "engine": f"transformers+{attn}", "batch": B,
                                         "error": f"{type(e).__name__}: {e}"[:300]})
                del model
                torch.cuda.empty_cache()
            except Exception as e:
                rows.append({"model": name, "compile": compile_, "error": traceback.format_exc()[-600:]})
    res["e2e"] = rows


def section_parity(res):
    import qwen2_pure
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = qwen2_pure.load(None, dtype=dtype, device="cuda", tokenizer=False).model
        ids = torch.randint(0, model.config.vocab_size, (1, 64), device="cuda", generator=None)
        ours = ours_run(model, ids, 64)[0]
        hf, _ = hf_from_ours(model, model.config, dtype, "sdpa")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)[0, 64:].tolist()
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        out[str(dtype)] = {"equal": ours == ref[:len(ours)], "first_divergence": first}
    res["parity"] = out


def section_decode(res, bw):
    from qwen2_pure.kernels import decode_attention
    rows = []
    for name, hq, hkv in (("7B GQA", 28, 4), ("72B GQA", 64, 8), ("MHA", 28, 28)):
        for B, S in ((1, 65536), (16, 4096), (64, 1024)):
            q = torch.randn(B, hq, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, hkv, S, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
            decode_attention(q, k, v, lens)
            t = min(sync_time(lambda: decode_attention(q, k, v, lens)) for _ in range(20))
            nbytes = 2 * k.numel() * 2
            rows.append({"shape": name, "B": B, "S": S, "seconds": t, "GBps": nbytes / t / 1e9,
                         "pct_copy": 100 * nbytes / t / 1e9 / bw})
            print(json.dumps(rows[-1]), flush=True)
            del q, k, v
    res["decode_kernel"] = rows


def section_lora(res):
    import qwen2_pure
    from qwen2_pure.lora import apply_lora
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        model = qwen2_pure.load(None, dtype=dtype, device="cuda", tokenizer=False).model.train()
        apply_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=16, alpha=32)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # adapters in fp32, the base in dtype
        opt = torch.optim.AdamW(params, lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        ids = torch.randint(0, model.config.vocab_size, (8, 512), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=dtype):
                logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        step()
        torch.cuda.reset_peak_memory_stats()
        t = sync_time(lambda: [step() for _ in range(5)]) / 5
        rows.append({"engine": "ours", "dtype": str(dtype), "tok_s": ids.numel() / t,
                     "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2 ** 30})
        print(json.dumps(rows[-1]), flush=True)
        del model, opt
        torch.cuda.empty_cache()
    res["lora"] = rows


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res.get("e2e", []) if "pct_roofline" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{r['model']}\n{r['engine']} B{r['batch']}" for r in rows]
    ax.bar(range(len(rows)), [r["pct_roofline"] for r in rows])
    ax.axhline(100, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("decode, % of HBM roofline")
    ax.set_title(f"{res['device']}: decode against (weights + KV bytes) / copy bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--budget-s", type=float, default=450, help="the whole run, seconds (sections stop early)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device (torch.cuda.is_available() is False); this benchmark runs only on a GPU",
              file=sys.stderr)
        return NO_CUDA_EXIT
    start = time.time()
    deadline = start + args.budget_s
    import triton
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "command": " ".join(sys.argv),
           "prompt": PROMPT, "new_tokens": NEW, "errors": {}}
    # (section, its time box in seconds)
    plan = [("bandwidth", 30), ("decode", 40), ("parity", 40), ("e2e", 240), ("lora", 60)]
    bw = None
    for name, box in plan:
        left = deadline - time.time()
        if left < 10:
            res["errors"][name] = "skipped: out of time"
            continue
        t0 = time.time()
        try:
            with time_box(min(box, left)):
                if name == "bandwidth":
                    res["bandwidth"] = copy_bandwidth()
                    bw = res["bandwidth"]["GBps"]
                elif bw is None:
                    raise RuntimeError("no copy bandwidth measured")
                elif name == "decode":
                    section_decode(res, bw)
                elif name == "parity":
                    section_parity(res)
                elif name == "e2e":
                    section_e2e(res, bw, time.time() + min(box, left) - 20)
                elif name == "lora":
                    section_lora(res)
        except BaseException as e:  # noqa: BLE001 - recorded, the next section runs
            if isinstance(e, KeyboardInterrupt):
                raise
            res["errors"][name] = traceback.format_exc()[-800:]
            print(f"== {name} FAILED: {type(e).__name__}: {e}", flush=True)
        res.setdefault("section_s", {})[name] = time.time() - t0
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_e2e.json").write_text(json.dumps(res, indent=1))
    try:
        plot(res, out / "gpu_e2e.png")
    except Exception as e:
        res["errors"]["plot"] = f"{type(e).__name__}: {e}"
        (out / "gpu_e2e.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'gpu_e2e.json'} in {time.time() - start:.0f} s; errors: {sorted(res['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
