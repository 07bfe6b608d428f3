"""End-to-end CPU speed: qwen2-pure against transformers and llama.cpp, same checkpoint, prompt and threads.

    python benchmarks/e2e.py                 # demo model; ours fp32/bf16, transformers fp32/bf16, llama.cpp if installed
    python benchmarks/e2e.py --ours float32 bfloat16 bfloat16+compile int8 int4 --transformers float32 bfloat16 \\
        --llama bf16 q4_k_m q4_k_m+fa --threads 2 --repeats 3 --out e2e.json --plot e2e.png

Variants. Ours: a dtype (`float32`, `bfloat16`, `float16`) or a weight quantization (`int8`, `int4`, activations
in bfloat16 unless written `int8:float32`), optionally `+compile`; passed to `qwen2_pure.load_model(path,
dtype=..., quantize=..., compile=...)` (quantize/compile only when the variant asks). transformers: a dtype,
default (SDPA) attention. llama.cpp (llama-cpp-python, `pip install 'qwen2-pure[bench]'`): `bf16` or `q4_k_m`
GGUFs made from the demo checkpoint by benchmarks/gguf_peers.py (or `--llama-gguf NAME=FILE`), `+fa` for
flash attention.

Method. Every engine variant runs in its own worker process (spawned once; loads once; then answers run
requests over a pipe), so load time and peak RSS are its own; each worker uses --threads threads. Within each
repeat the parent asks every worker in turn (drift hits all alike; the others sit idle): TTFT = a generation
of 1 token (prefill with the output head on the last position only + one greedy pick), then a generation of N
tokens; prefill tok/s = prompt tokens / TTFT, decode tok/s = (N - 1) / (time of N tokens - TTFT). Greedy, no
early stop; the prompt is the README's text, repeated, as token ids from our tokenizer (llama.cpp gets the same
ids). Medians and min–max over the repeats. When the N-token run is not slower than the 1-token run (noise
swamps N - 1 decode steps: a busy machine, or N too small), that repeat's decode rate is not measurable: it is
null in the JSON and "n/a (noise)" in the table and the log, never a negative or infinite figure; the median
decode rate is (N - 1) / the median decode time over all repeats, null when that is not positive. Peak RSS is
the worker's VmHWM (the high-water mark of its own address space; ru_maxrss is not used because Linux carries
the parent's peak across fork+exec into it).

Machine ceilings, measured in the parent before the engines and again after them: read bandwidth (sum of a
--bandwidth-mib fp32 tensor, best of several) and matmul rate in fp32 and bf16 (torch.matmul of a prefill's
MLP shape, (prompt × hidden) @ (hidden × intermediate), the better of a (K, N) right operand and the transpose
of an (N, K) one as nn.Linear stores it: on CPUs without bf16 arithmetic the two differ by up to 7x in bf16).
The rooflines use the better of the two measurements (before, after):

  decode roofline tok/s  = bandwidth / bytes read per token, where bytes = all linear weights and biases incl.
                           lm_head at the engine's storage precision (`decode_bytes_per_token`); the KV cache,
                           norms and the one embedding row are left out. llama.cpp: the GGUF's tensor bytes
                           minus token_embd (kept when the file has no output.weight).
  prefill roofline tok/s = matmul rate of the compute dtype / FLOPs per prompt token (`prefill_flops_per_token`):
                           2·(decoder linear params) + attention 2·H_q·D·(T+1) per layer (QKᵀ and AV over the
                           causal average of (T+1)/2 keys) + the lm_head's 2·V·H once per prompt, divided by T.
                           Quantized variants (ours) are rated at the faster of fp32 and bf16 (their prompt
                           products dequantize to a dense GEMM), llama.cpp at fp32.

Output: stderr gets a line per measurement; stdout the markdown table, the machine figures, how many greedy
tokens of each engine equal the first engine's (a check that all did the same work), then the ratios ours/peer
for every pair of variants, last. --out writes JSON, --plot a PNG (matplotlib).
"""

from __future__ import annotations

# Only the standard library at module level: spawned workers re-import this file, and the llama.cpp worker
# must not pay for torch in its memory (nor anyone for transformers).
import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Optional
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FP_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# as qwen2_pure/quant.py stores them: int8 one fp32 scale per output row; int4 a bf16 scale and zero point per
# group of 32 inputs of a row, and the lm_head in int8 (as Q4_K_M keeps the output at 6 bits)
INT8_SCALE_BYTES = 4
INT4_GROUP, INT4_GROUP_BYTES = 32, 2 * 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- roofline arithmetic (pure functions of config.json) ---------------------------------------------------

def model_dims(cfg: dict) -> dict:
    """The sizes the formulas need, from a config.json dict."""
    H, nq = cfg["hidden_size"], cfg["num_attention_heads"]
    return {"H": H, "I": cfg["intermediate_size"], "L": cfg["num_hidden_layers"], "Hq": nq,
            "Hkv": cfg.get("num_key_value_heads") or nq, "D": cfg.get("head_dim") or H // nq, "V": cfg["vocab_size"]}


def linear_params(cfg: dict) -> dict:
    """Parameter counts of the linears every token goes through.

    decoder: per layer q (H·Hq·D), k and v (H·Hkv·D each), o (Hq·D·H), gate, up, down (H·I each);
    bias: q, k, v biases; lm_head: V·H (read whether or not it is tied to the embedding);
    rows: output rows of all those matrices (one int8 scale each).
    """
    d = model_dims(cfg)
    H, I, L, Hq, Hkv, D, V = (d[k] for k in ("H", "I", "L", "Hq", "Hkv", "D", "V"))
    return {"decoder": L * (H * Hq * D + 2 * H * Hkv * D + Hq * D * H + 3 * H * I),
            "bias": L * (Hq * D + 2 * Hkv * D), "lm_head": V * H,
            "rows": L * (Hq * D + 2 * Hkv * D + H + 2 * I + H) + V}


def decode_bytes_per_token(cfg: dict, storage: str, act: str = "bfloat16") -> float:
    """Bytes of weights one decode step reads: matrices at `storage` precision, biases in `act`.

    W = decoder + lm_head parameters. float32 / bfloat16 / float16: (W + biases)·bytes; int8: W·1 + an fp32
    scale per output row; int4: decoder·0.5 + a bf16 scale and zero per group of INT4_GROUP inputs, and the
    lm_head in int8 (V·H + V scales).
    """
    p, a = linear_params(cfg), FP_BYTES[act]
    if storage in FP_BYTES:
        return (p["decoder"] + p["lm_head"] + p["bias"]) * FP_BYTES[storage]
    V = model_dims(cfg)["V"]
    if storage == "int8":
        return p["decoder"] + p["lm_head"] + p["rows"] * INT8_SCALE_BYTES + p["bias"] * a
    if storage == "int4":
        return (p["decoder"] * 0.5 + p["decoder"] / INT4_GROUP * INT4_GROUP_BYTES
                + p["lm_head"] + V * INT8_SCALE_BYTES + p["bias"] * a)
    raise ValueError(f"storage {storage!r}: expected one of float32, bfloat16, float16, int8, int4")


def prefill_flops_per_token(cfg: dict, T: int) -> float:
    """FLOPs of a T-token prefill divided by T: decoder linears on every token, causal attention, lm_head once."""
    d, p = model_dims(cfg), linear_params(cfg)
    attention = d["L"] * 2 * d["Hq"] * d["D"] * (T + 1)  # per token: 4·Hq·D·(keys seen), averaged (T+1)/2
    return 2 * p["decoder"] + attention + 2 * p["lm_head"] / T


def gguf_weight_bytes(path) -> int:
    """Bytes of the tensors a llama.cpp decode step reads: all but token_embd (unless it is the output too)."""
    from qwen2_pure.loading.gguf import open_gguf
    tensors = {t.name: int(t.n_bytes) for t in open_gguf(path).tensors}
    total = sum(tensors.values())
    return total if "output.weight" not in tensors else total - tensors.get("token_embd.weight", 0)


# ---- variants ----------------------------------------------------------------------------------------------

def parse_ours(variant: str) -> dict:
    """'bfloat16+compile' -> load kwargs and the precisions the rooflines use."""
    base, *flags = variant.split("+")
    if any(f != "compile" for f in flags):
        raise ValueError(f"--ours {variant!r}: the only suffix is +compile")
    kwargs, quant = {}, None
    if base.split(":")[0] in ("int8", "int4"):
        quant, _, act = base.partition(":")
        act = act or "bfloat16"
        kwargs["quantize"] = quant
    else:
        act = base
    if act not in FP_BYTES:
        raise ValueError(f"--ours {variant!r}: dtype {act!r} is not one of {sorted(FP_BYTES)}")
    kwargs["dtype"] = act
    if flags:
        kwargs["compile"] = True
    # quantized products may run dense GEMMs of dequantized weights in either dtype: rate them at the faster
    # and our bf16/fp16 prompts run fp32 GEMMs on CPUs without bf16 arithmetic (qwen2_pure.ops.linear)
    return {"kwargs": kwargs, "storage": quant or act, "compute": "best" if quant or act != "float32" else act}


def parse_llama(variant: str) -> dict:
    base, *flags = variant.split("+")
    if base not in ("bf16", "q4_k_m") or any(f != "fa" for f in flags):
        raise ValueError(f"--llama {variant!r}: expected bf16 or q4_k_m, optionally +fa")
    return {"gguf": base, "flash_attn": bool(flags)}


# ---- workers -----------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """High-water RSS of this process's own address space (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Ours:
    def __init__(self, spec):
        import torch
        import qwen2_pure as q
        torch.set_num_threads(spec["threads"])
        self.q = q
        self.model = q.load_model(spec["path"], **parse_ours(spec["variant"])["kwargs"])
        self.version = q.__version__
        # what was loaded, for comparison with decode_bytes_per_token: every parameter and buffer (each tensor
        # once) except the token embedding, unless the lm_head shares it
        names, tensors = {}, {}
        for n, t in [*self.model.named_parameters(remove_duplicate=False),
                     *self.model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), []).append(n)
            tensors[id(t)] = t
        self.weight_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                                if not all("embed_tokens" in n for n in names[k]))

    def run(self, ids, n):
        t0 = time.perf_counter()
        [new] = self.q.generate(self.model, [ids], max_new_tokens=n, stop_token_ids=[])
        return time.perf_counter() - t0, list(new)


class Transformers:
    def __init__(self, spec):
        import torch
        import transformers
        torch.set_num_threads(spec["threads"])
        self.torch, self.version = torch, transformers.__version__
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["path"], dtype=getattr(torch, spec["variant"])).eval()
        self.weight_bytes = None

    def run(self, ids, n):
        x = self.torch.tensor([ids])
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, top_k=None, top_p=None, temperature=None,
                                      pad_token_id=0)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()


class LlamaCpp:
    def __init__(self, spec):
        import llama_cpp
        v = parse_llama(spec["variant"])
        n = spec["prompt_tokens"]
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=str(spec["gguf_path"]), n_ctx=n + spec["new_tokens"] + 16,
                                   n_batch=max(n, 32), n_ubatch=max(n, 32), n_threads=spec["threads"],
                                   n_threads_batch=spec["threads"], logits_all=False, flash_attn=v["flash_attn"],
                                   verbose=False)
        self.weight_bytes = None

    def run(self, ids, n):
        llm = self.llm
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(ids)  # the prompt; logits of the last position only (logits_all=False)
        new = [llm.sample(temp=0.0, repeat_penalty=1.0)]
        for _ in range(n - 1):
            llm.eval(new[-1:])
            new.append(llm.sample(temp=0.0, repeat_penalty=1.0))
        return time.perf_counter() - t0, new


ENGINES = {"qwen2-pure": Ours, "transformers": Transformers, "llama.cpp": LlamaCpp}


def worker_main(conn, spec):
    """One engine variant: load, warm up, then answer ('run', ids, n) / ('rss',) / ('stop',) requests."""
    try:
        t0 = time.perf_counter()
        eng = ENGINES[spec["engine"]](spec)
        load_s = time.perf_counter() - t0
        rss_load = peak_rss_mb()
        t0 = time.perf_counter()
        eng.run(spec["warmup_ids"], 2)  # the real prompt length and one decode step (compiles what compiles)
        conn.send({"ok": True, "load_s": load_s, "warmup_s": time.perf_counter() - t0, "rss_after_load_mb": rss_load,
                   "version": eng.version, "weight_bytes_loaded": eng.weight_bytes})
    except BaseException as e:
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return
    while True:
        msg = conn.recv()
        if msg[0] == "run":
            conn.send(eng.run(msg[1], msg[2]))
        elif msg[0] == "rss":
            conn.send(peak_rss_mb())
        else:
            return


class Worker:
    def __init__(self, ctx, spec):
        self.engine, self.variant = spec["engine"], spec["variant"]
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()
        self.info = self._recv()

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            return {"ok": False, "error": f"worker exited with code {self.proc.exitcode}"}

    def ask(self, *msg):
        self.conn.send(msg)
        out = self._recv()
        if isinstance(out, dict) and not out.get("ok", True):
            raise RuntimeError(f"{self.engine} {self.variant}: {out['error']}")
        return out

    def stop(self):
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


# ---- machine -----------------------------------------------------------------------------------------------

def _best_time(fn, reps: int, min_s: float = 0.2) -> float:
    fn()  # warm-up
    best, total, i = float("inf"), 0.0, 0
    while i < reps or total < min_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, i = min(best, dt), total + dt, i + 1
    return best


def measure_machine(threads: int, bandwidth_mib: int, mm_shape: tuple) -> dict:
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(bandwidth_mib * 2**20 // 4, dtype=torch.float32)
    gbs = x.numel() * 4 / _best_time(lambda: x.sum(), reps=5) / 1e9
    x = None  # free the buffer before the matmuls
    M, K, N = mm_shape
    by_layout = {}
    for name in ("float32", "bfloat16"):
        dt = getattr(torch, name)
        a, b = torch.randn(M, K).to(dt), torch.randn(K, N).to(dt)
        w = b.t().contiguous()  # (N, K): how nn.Linear stores its weight
        by_layout[name] = {layout: 2 * M * K * N / _best_time(f, reps=3) / 1e9 for layout, f in
                           (("a@b", lambda: torch.matmul(a, b)), ("a@w.t()", lambda: torch.matmul(a, w.t())))}
    return {"read_gb_s": gbs, "matmul_gflop_s": {k: max(v.values()) for k, v in by_layout.items()},
            "matmul_gflop_s_by_layout": by_layout, "matmul_shape": list(mm_shape),
            "bandwidth_bytes": bandwidth_mib * 2**20}


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                model = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
            if flags and model:
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "fma")
    return {"cpu_model": model, "cpu_flags": {f: f in flags for f in wanted}, "cpu_count": os.cpu_count()}


# ---- driver ------------------------------------------------------------------------------------------------

def prompt_ids(tok, n: int) -> list[int]:
    """n tokens of real text (the project's README, repeated) so the prompt is not degenerate."""
    ids = tok.encode((ROOT / "README.md").read_text(encoding="utf-8"))
    while len(ids) < n:
        ids += ids
    return ids[:n]


def llama_ggufs(args) -> dict:
    """{'bf16': path, 'q4_k_m': path} for the requested llama variants, or {} with one line when unavailable."""
    import importlib.util
    given = dict(kv.split("=", 1) for kv in args.llama_gguf)
    if not args.llama:
        return {}
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp peers skipped: llama-cpp-python is not installed "
              "(pip install 'qwen2-pure[bench]'; it builds llama.cpp from source, ~15 min)", flush=True)
        return {}
    need = sorted({parse_llama(v)["gguf"] for v in args.llama} - set(given))
    if need:
        import subprocess
        p = subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_peers.py")), *need],
                           stdout=subprocess.PIPE, text=True, check=True)  # progress goes to our stderr
        given.update(line.split("\t", 1) for line in p.stdout.splitlines() if "\t" in line)
    return {k: Path(v) for k, v in given.items()}


def decode_rate(new_tokens: int, decode_s: float) -> Optional[float]:
    """(N - 1) / the decode time (time of N tokens - TTFT), or None when that time is not positive: noise
    swamped the difference, and no rate (least of all a negative or infinite one) can be read from it."""
    return (new_tokens - 1) / decode_s if decode_s > 0 else None


def summarize(name, variant, samples, info, prompt_tokens, new_tokens) -> dict:
    ttft, dec = samples["ttft"], samples["decode"]
    decode_s = [total - first for total, first in zip(samples["total"], ttft)]
    rates = [x for x in dec if x is not None]
    return {"engine": name, "variant": variant, "ttft_s": statistics.median(ttft),
            "ttft_s_range": [min(ttft), max(ttft)],
            "prefill_tok_s": prompt_tokens / statistics.median(ttft),
            "prefill_tok_s_range": [prompt_tokens / max(ttft), prompt_tokens / min(ttft)],
            "decode_tok_s": decode_rate(new_tokens, statistics.median(decode_s)),
            "decode_tok_s_range": [min(rates), max(rates)] if rates else None,
            "decode_noise_repeats": len(dec) - len(rates),
            "load_s": info["load_s"], "warmup_s": info["warmup_s"], "rss_after_load_mb": info["rss_after_load_mb"],
            "peak_rss_mb": info["peak_rss_mb"], "weight_bytes_loaded": info.get("weight_bytes_loaded"),
            "samples": samples}


def add_rooflines(r: dict, cfg: dict, machine: dict, T: int, ggufs: dict) -> None:
    """decode/prefill roofline tok/s and % of them, from the better of the before/after machine figures."""
    bw = max(m["read_gb_s"] for m in machine.values()) * 1e9
    rate = {k: max(m["matmul_gflop_s"][k] for m in machine.values()) * 1e9 for k in ("float32", "bfloat16")}
    rate["best"] = max(rate.values())
    if r["engine"] == "qwen2-pure":
        v = parse_ours(r["variant"])
        nbytes, compute = decode_bytes_per_token(cfg, v["storage"], v["kwargs"]["dtype"]), v["compute"]
    elif r["engine"] == "transformers":
        nbytes, compute = decode_bytes_per_token(cfg, r["variant"]), r["variant"]
    else:
        nbytes, compute = gguf_weight_bytes(ggufs[parse_llama(r["variant"])["gguf"]]), "float32"
    loaded = r.get("weight_bytes_loaded")
    if loaded and not 0.9 < loaded / nbytes < 1.1:  # e.g. another int4 group size than INT4_GROUP
        log(f"note: {r['engine']} {r['variant']} holds {loaded / 1e6:.1f} MB of weights besides the embedding, "
            f"the roofline formula counts {nbytes / 1e6:.1f} MB read per token")
    flops = prefill_flops_per_token(cfg, T)
    r["bytes_per_token"], r["flops_per_prompt_token"], r["prefill_compute_dtype"] = nbytes, flops, compute
    r["decode_roofline_tok_s"] = bw / nbytes
    r["prefill_roofline_tok_s"] = rate[compute] / flops if compute in rate else None
    r["decode_pct_roofline"] = 100 * r["decode_tok_s"] / r["decode_roofline_tok_s"] if r["decode_tok_s"] else None
    r["prefill_pct_roofline"] = (100 * r["prefill_tok_s"] / r["prefill_roofline_tok_s"]
                                 if r["prefill_roofline_tok_s"] else None)


NOISE = "n/a (noise)"


def decode_cell(r: dict) -> str:
    """The table's decode figure: median (min–max), with the repeats noise swamped counted, or n/a (noise)."""
    if r["decode_tok_s"] is None:
        return NOISE
    dlo, dhi = r["decode_tok_s_range"]
    noisy = f"; {r['decode_noise_repeats']} of {len(r['samples']['decode'])} repeats n/a" \
        if r["decode_noise_repeats"] else ""
    return f"{r['decode_tok_s']:.2f} ({dlo:.2f}–{dhi:.2f}{noisy})"


def table(results: list[dict]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{x:.0f} %"
    lines = ["| engine | variant | prefill tok/s (min–max) | TTFT s | decode tok/s (min–max) | % decode roofline "
             "| % prefill roofline | load s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = r["prefill_tok_s_range"]
        lines.append(f"| {r['engine']} | {r['variant']} | {r['prefill_tok_s']:.1f} ({lo:.1f}–{hi:.1f}) | "
                     f"{r['ttft_s']:.3f} | {decode_cell(r)} | "
                     f"{pct(r['decode_pct_roofline'])} | {pct(r['prefill_pct_roofline'])} | {r['load_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[dict]:
    ours = [r for r in results if r["engine"] == "qwen2-pure"]
    peers = [r for r in results if r["engine"] != "qwen2-pure"]
    return [{"ours": a["variant"], "peer": f"{b['engine']} {b['variant']}",
             "prefill": a["prefill_tok_s"] / b["prefill_tok_s"],
             "decode": a["decode_tok_s"] / b["decode_tok_s"] if a["decode_tok_s"] and b["decode_tok_s"] else None}
            for a in ours for b in peers]


def plot(results: list[dict], path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['engine']}\n{r['variant']}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(results)), 4.8))
    colors = {"qwen2-pure": "tab:blue", "transformers": "tab:orange", "llama.cpp": "tab:green"}
    for ax, key, name in zip(axes, ("prefill", "decode"), ("prefill tok/s", "decode tok/s")):
        # a figure noise swamped (None) gets no bar, only the words; a range over fewer repeats is drawn as it is
        vals = [r[f"{key}_tok_s"] or 0.0 for r in results]
        ranges = [r[f"{key}_tok_s_range"] or [v, v] for v, r in zip(vals, results)]
        err = [[max(v - lo, 0.0) for v, (lo, hi) in zip(vals, ranges)],
               [max(hi - v, 0.0) for v, (lo, hi) in zip(vals, ranges)]]
        xs = range(len(results))
        ax.bar(xs, vals, yerr=err, capsize=3, color=[colors.get(r["engine"], "gray") for r in results])
        for x, r in zip(xs, results):
            if r[f"{key}_tok_s"] is None:
                ax.text(x, 0, NOISE, ha="center", va="bottom", rotation=90, fontsize=7)
        roof = [r[f"{key}_roofline_tok_s"] for r in results]
        for x, y in zip(xs, roof):
            if y:
                ax.hlines(y, x - 0.4, x + 0.4, colors="black", linestyles="--", linewidth=1)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{name} (median, min–max; dashed: roofline)", fontsize=9)
    fig.suptitle(title.replace(" threads, ", " threads,\n", 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF-layout model folder (default: the demo checkpoint)")
    ap.add_argument("--ours", nargs="*", default=["float32", "bfloat16"],
                    help="our variants: float32 | bfloat16 | float16 | int8[:dtype] | int4[:dtype], +compile")
    ap.add_argument("--transformers", nargs="*", default=["float32", "bfloat16"], help="dtypes; none to skip")
    ap.add_argument("--llama", nargs="*", default=["bf16", "q4_k_m"], help="bf16 | q4_k_m, +fa; none to skip")
    ap.add_argument("--llama-gguf", nargs="*", default=[], metavar="NAME=FILE",
                    help="use these GGUFs (bf16=..., q4_k_m=...) instead of the demo-derived ones")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads per engine (default: torch's default)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the tensor summed for bandwidth")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    ap.add_argument("--plot", default=None, help="write a PNG bar chart to this file")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        ap.error("--repeats ≥ 1, --new-tokens ≥ 2 (decode needs a second token), --prompt-tokens ≥ 1")
    try:
        for v in args.ours:
            parse_ours(v)
        for v in args.llama:
            parse_llama(v)
    except ValueError as e:
        ap.error(str(e))
    for v in args.transformers:
        if v not in FP_BYTES:
            ap.error(f"--transformers {v!r}: expected one of {sorted(FP_BYTES)}")

    import multiprocessing as mp
    import torch
    import qwen2_pure as q
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.model is None:
        from qwen2_pure.loading.demo import demo_model_dir
        path = demo_model_dir()
    else:
        path = Path(args.model)
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    ids = prompt_ids(q.load_tokenizer(path), args.prompt_tokens)
    T, N = len(ids), args.new_tokens
    ggufs = llama_ggufs(args)
    llama_variants = [v for v in args.llama if parse_llama(v)["gguf"] in ggufs]

    d = model_dims(cfg)
    mm_shape = (T, d["H"], d["I"])
    machine = {}
    log(f"machine (before): {threads} threads, summing {args.bandwidth_mib} MiB, matmul {mm_shape} ...")
    machine["before"] = measure_machine(threads, args.bandwidth_mib, mm_shape)
    log(f"machine (before): read {machine['before']['read_gb_s']:.1f} GB/s, matmul "
        f"{machine['before']['matmul_gflop_s']['float32']:.1f} GFLOP/s fp32, "
        f"{machine['before']['matmul_gflop_s']['bfloat16']:.1f} bf16")

    specs = [("qwen2-pure", v) for v in args.ours] + [("transformers", v) for v in args.transformers] \
        + [("llama.cpp", v) for v in llama_variants]
    ctx = mp.get_context("spawn")
    workers, skipped = [], []
    for engine, variant in specs:
        spec = {"engine": engine, "variant": variant, "path": str(path), "threads": threads,
                "prompt_tokens": T, "new_tokens": N, "warmup_ids": ids}
        if engine == "llama.cpp":
            spec["gguf_path"] = str(ggufs[parse_llama(variant)["gguf"]])
        log(f"loading {engine} {variant} ...")
        w = Worker(ctx, spec)
        if not w.info["ok"]:
            log(f"{engine} {variant} skipped: {w.info['error']}")
            log(w.info.get("traceback", ""))
            skipped.append({"engine": engine, "variant": variant, "error": w.info["error"]})
            w.stop()
            continue
        log(f"loaded {engine} {variant}: {w.info['load_s']:.1f} s, warm-up {w.info['warmup_s']:.1f} s, "
            f"RSS {w.info['rss_after_load_mb']:.0f} MB")
        workers.append(w)

    samples = {id(w): {"ttft": [], "total": [], "decode": []} for w in workers}
    try:
        for rep in range(args.repeats):
            for w in workers:  # alternate inside each repeat
                ttft, _ = w.ask("run", ids, 1)
                total, w.tokens = w.ask("run", ids, N)
                s = samples[id(w)]
                s["ttft"].append(ttft)
                s["total"].append(total)
                s["decode"].append(decode_rate(N, total - ttft))
                if s["decode"][-1] is None:
                    log(f"warning: {w.engine} {w.variant}: the {N}-token run took {total:.3f} s, no longer than the "
                        f"1-token run ({ttft:.3f} s): noise swamps the decode time (a busy machine, or N too small); "
                        "this repeat's decode rate is not measurable")
                rate = NOISE if s["decode"][-1] is None else f"{s['decode'][-1]:.2f} tok/s"
                log(f"[repeat {rep + 1}/{args.repeats}] {w.engine} {w.variant}: TTFT {ttft:.3f} s "
                    f"(prefill {T / ttft:.1f} tok/s), {N} tokens {total:.2f} s, decode {rate}")
        results = []
        for w in workers:
            w.info["peak_rss_mb"] = w.ask("rss")
            results.append(summarize(w.engine, w.variant, samples[id(w)], w.info, T, N))
            # the greedy tokens of the last N-token run, and how many lead the same as the first engine's
            results[-1]["tokens"] = w.tokens
            results[-1]["same_tokens_as_first"] = next(
                (i for i, (a, b) in enumerate(zip(w.tokens, workers[0].tokens)) if a != b), N)
    finally:
        for w in workers:
            w.stop()

    if args.out:  # the raw samples first: a failure below must not lose a long run
        Path(args.out).with_suffix(".samples.json").write_text(json.dumps(results, indent=1, default=str))
    log("machine (after) ...")
    machine["after"] = measure_machine(threads, args.bandwidth_mib, mm_shape)
    for r in results:
        add_rooflines(r, cfg, machine, T, ggufs)

    versions = {"torch": torch.__version__, "qwen2_pure": q.__version__}
    for w in workers:
        if w.engine != "qwen2-pure":
            versions[w.engine] = w.info["version"]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), **cpu_info(), "threads": threads, "versions": versions,
            "python": platform.python_version(), "model": str(path), "prompt_tokens": T, "new_tokens": N,
            "repeats": args.repeats, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "int4_group_assumed": INT4_GROUP}
    flags = ", ".join(k for k, v in meta["cpu_flags"].items() if v) or "none of the listed"
    title = (f"{meta['date'][:10]}, {meta['cpu_model']} ({flags}), {threads} threads, torch {torch.__version__}, "
             f"{path.name}, {T}-token prompt, {N} new tokens, medians of {args.repeats}")
    print(f"\n{title}\n")
    print(table(results))
    print()
    for k, m in machine.items():
        mm = m["matmul_gflop_s"]
        print(f"machine {k}: read {m['read_gb_s']:.1f} GB/s; matmul {tuple(m['matmul_shape'])} "
              f"{mm['float32']:.1f} GFLOP/s fp32, {mm['bfloat16']:.1f} GFLOP/s bf16")
    if len(results) > 1:
        print(f"greedy tokens equal to {results[0]['engine']} {results[0]['variant']}'s before the first "
              "difference: " + ", ".join(f"{r['engine']} {r['variant']} {r['same_tokens_as_first']}/{N}"
                                          for r in results[1:]))
    for s in skipped:
        print(f"skipped {s['engine']} {s['variant']}: {s['error']}")
    rs = ratios(results)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "machine": machine, "results": results,
                                              "skipped": skipped, "ratios": rs}, indent=2))
        log(f"wrote {args.out}")
    if args.plot:
        try:
            plot(results, args.plot, title)
            log(f"wrote {args.plot}")
        except ImportError:
            log("--plot skipped: matplotlib is not installed (pip install matplotlib)")
    print()
    for r in rs:
        decode = NOISE if r["decode"] is None else f"{r['decode']:.2f}x"
        print(f"ours {r['ours']} / {r['peer']}: prefill {r['prefill']:.2f}x, decode {decode}")


if __name__ == "__main__":
    main()
