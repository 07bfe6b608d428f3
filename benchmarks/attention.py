"""GQA vs MHA attention: prefill and decode at the real shapes of Qwen2-0.5B, 7B and 72B.

Same number of query heads H_q for every config; H_kv in {H_q (MHA), H_q/2, Qwen2's own, 1 (MQA)}.
Paths: our Triton kernels (qwen2_pure.kernels), torch SDPA (flash / efficient backends with enable_gqa),
and the naive repeat_kv + SDPA. Prefill is reported in TFLOP/s (4*B*H_q*T^2*D, halved for causal);
decode in GB/s of K+V read (2*B*H_kv*S*D*bytes per call) and as a % of the copy bandwidth measured in the
same run. The KV-cache table gives bytes per token and at 32K context for each config.

On a CPU it runs the torch paths (SDPA math/default, repeat_kv) at small sizes plus the memory tables;
`--smoke` is the CI-sized run. Writes attention.json (all raw numbers) and attention.png to --out.

    python benchmarks/attention.py                 # GPU: full shapes, bf16
    python benchmarks/attention.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# name: (H_q, Qwen2's H_kv, head_dim, layers)
MODELS = {"Qwen2-0.5B": (14, 2, 64, 24), "Qwen2-7B": (28, 4, 128, 28), "Qwen2-72B": (64, 8, 128, 80)}


def kv_configs(hq: int, hkv: int) -> list[tuple[str, int]]:
    out = [("MHA", hq), ("G=2", hq // 2), (f"Qwen2 G={hq // hkv}", hkv), ("MQA", 1)]
    seen, keep = set(), []
    for name, h in out:
        if h not in seen and hq % h == 0:
            seen.add(h)
            keep.append((name, h))
    return keep


def timer(device: str, iters: int):
    def bench(fn) -> float:
        """Median seconds per call."""
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            from triton.testing import do_bench
            return do_bench(fn, warmup=10, rep=max(20, iters * 5), return_mode="median") / 1e3
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    return bench


def copy_bandwidth(device: str, bench, nbytes: int) -> float:
    """GB/s of a device-to-device copy, read + write bytes counted."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * nbytes / t / 1e9


def matmul_tflops(device: str, bench, n: int, dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / bench(lambda: a @ b) / 1e12


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up call that autotunes): replay costs no Python or launch
    overhead, which is what a decode step captured whole (static KV cache) pays."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def prefill_paths(device, kernels):
    paths = {}
    if kernels is not None:
        paths["triton"] = lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def with_backend(backend):
            def run(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return run
        paths["sdpa-flash"] = with_backend(SDPBackend.FLASH_ATTENTION)
        paths["sdpa-efficient"] = with_backend(SDPBackend.EFFICIENT_ATTENTION)
    else:
        paths["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    paths["repeat_kv+sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
        q, repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1]), is_causal=True)
    return paths


def decode_paths(device, kernels):
    paths = {}
    if kernels is not None:
        paths["triton"] = lambda q, k, v, lens: kernels.decode_attention(q, k, v, lens)
    paths["sdpa"] = lambda q, k, v, lens: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
    paths["repeat_kv+sdpa"] = lambda q, k, v, lens: F.scaled_dot_product_attention(
        q[:, :, None], repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1]))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CI-sized run: tiny T and S, one iteration")
    ap.add_argument("--out", default="benchmarks/out", help="folder for attention.json and attention.png")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 (GPU default), fp16 or fp32 (CPU default)")
    ap.add_argument("--prefill-len", type=int, default=None, help="T for prefill (GPU 4096, CPU 256)")
    ap.add_argument("--decode-batch", type=int, default=None)
    ap.add_argument("--decode-len", type=int, default=None, help="S for decode (GPU 8192 with B=8: B*S = 64K)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-prefill", action="store_true", help="decode and memory tables only")
    args = ap.parse_args(argv)
    device = args.device
    gpu = device == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if gpu else "fp32")]
    T = args.prefill_len or (4096 if gpu else (64 if args.smoke else 256))
    B_dec = args.decode_batch or (8 if gpu else 2)
    S_dec = args.decode_len or (8192 if gpu else (128 if args.smoke else 1024))
    iters = 1 if args.smoke else (20 if gpu else 5)
    bench = timer(device, iters)
    kernels = None
    if gpu:
        try:
            import qwen2_pure.kernels as kernels
        except ImportError as e:
            print(f"triton kernels unavailable ({e}); torch paths only", file=sys.stderr)
    esize = torch.finfo(dtype).bits // 8
    result = {"device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
              "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "prefill_T": T,
              "decode_B": B_dec, "decode_S": S_dec, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:],
              "ceilings": {}, "prefill": [], "decode": [], "kv_cache": []}
    bw_bytes = (1 << 30) if gpu else (1 << 24 if args.smoke else 1 << 27)
    result["ceilings"]["copy_GBps"] = copy_bandwidth(device, bench, bw_bytes)
    result["ceilings"]["matmul_TFLOPs"] = matmul_tflops(device, bench, 8192 if gpu else 256, dtype)
    print(f"# {result['device']}  {result['dtype']}  copy {result['ceilings']['copy_GBps']:.0f} GB/s, "
          f"matmul {result['ceilings']['matmul_TFLOPs']:.1f} TFLOP/s")

    models = [m for m in args.models.split(",") if m]
    for name in models:
        hq, hkv_qwen, D, layers = MODELS[name]
        for label, hkv in kv_configs(hq, hkv_qwen):
            per_token = 2 * layers * hkv * D * 2  # K and V, every layer, bf16
            result["kv_cache"].append({"model": name, "config": label, "H_q": hq, "H_kv": hkv, "D": D,
                                       "layers": layers, "bytes_per_token_bf16": per_token,
                                       "GiB_at_32K_bf16": per_token * 32768 / 2 ** 30})
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(1, hq, T, D, generator=g).to(device, dtype)
            k = torch.randn(1, hkv, T, D, generator=g).to(device, dtype)
            v = torch.randn(1, hkv, T, D, generator=g).to(device, dtype)
            flops = 4 * hq * T * T * D * 0.5
            for path, fn in ({} if args.no_prefill else prefill_paths(device, kernels)).items():
                try:
                    t = bench(lambda: fn(q, k, v))
                    row = {"model": name, "config": label, "H_kv": hkv, "path": path, "ms": t * 1e3,
                           "TFLOPs": flops / t / 1e12}
                except Exception as e:  # a backend that refuses the shape (e.g. flash without GQA support)
                    row = {"model": name, "config": label, "H_kv": hkv, "path": path, "error": str(e)[:120]}
                result["prefill"].append(row)
            del q, k, v
            qd = torch.randn(B_dec, hq, D, generator=g).to(device, dtype)
            kc = torch.randn(B_dec, hkv, S_dec, D, generator=g).to(device, dtype)
            vc = torch.randn(B_dec, hkv, S_dec, D, generator=g).to(device, dtype)
            lens = torch.full((B_dec,), S_dec, dtype=torch.int32, device=device)
            kv_bytes = 2 * B_dec * hkv * S_dec * D * esize
            for path, fn in decode_paths(device, kernels).items():
                try:
                    call = lambda: fn(qd, kc, vc, lens)  # noqa: E731
                    t_eager = bench(call)
                    t = bench(graphed(call)) if gpu else t_eager
                    gbps = kv_bytes / t / 1e9
                    row = {"model": name, "config": label, "H_kv": hkv, "path": path, "us": t * 1e6, "GBps": gbps,
                           "pct_copy_bw": 100 * gbps / result["ceilings"]["copy_GBps"], "us_eager": t_eager * 1e6}
                except Exception as e:
                    row = {"model": name, "config": label, "H_kv": hkv, "path": path, "error": str(e)[:120]}
                result["decode"].append(row)
            del qd, kc, vc

    print(f"\n## KV cache (bf16, all layers): bytes per token and GiB at 32K context")
    print(f"{'model':<11} {'config':<12} {'H_kv':>4} {'KiB/token':>10} {'GiB@32K':>8}")
    for r in result["kv_cache"]:
        print(f"{r['model']:<11} {r['config']:<12} {r['H_kv']:>4} {r['bytes_per_token_bf16'] / 1024:>10.1f} "
              f"{r['GiB_at_32K_bf16']:>8.2f}")
    print(f"\n## Prefill, B=1, T={T}, causal: TFLOP/s (ms)")
    for r in result["prefill"]:
        val = f"{r['TFLOPs']:8.2f} ({r['ms']:.3f} ms)" if "ms" in r else f"n/a: {r['error']}"
        print(f"{r['model']:<11} {r['config']:<12} {r['H_kv']:>4} {r['path']:<15} {val}")
    print(f"\n## Decode, B={B_dec}, S={S_dec}: GB/s of K+V read, % of copy bandwidth, time, speed-up over MHA"
          + (" (CUDA-graph replay; eager time last)" if gpu else ""))
    mha = {(r["model"], r["path"]): r["us"] for r in result["decode"] if r["config"] == "MHA" and "us" in r}
    for r in result["decode"]:
        if "us" in r:
            r["speedup_vs_mha"] = mha.get((r["model"], r["path"]), float("nan")) / r["us"]
            val = f"{r['GBps']:8.1f} GB/s {r['pct_copy_bw']:5.1f}%  {r['us']:9.1f} us  x{r['speedup_vs_mha']:.2f}"
            val += f"  eager {r['us_eager']:9.1f} us" if gpu else ""
        else:
            val = f"n/a: {r['error']}"
        print(f"{r['model']:<11} {r['config']:<12} {r['H_kv']:>4} {r['path']:<15} {val}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(result, indent=2))
    try:
        _plot(result, out / "attention.png")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"\nwrote {out / 'attention.json'}")
    return 0


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, metric, title in [(axes[0], "prefill", "TFLOPs", "prefill TFLOP/s"),
                                   (axes[1], "decode", "GBps", "decode GB/s (K+V)"),
                                   (axes[2], "decode", "us", "decode time (us)")]:
        rows = [r for r in result[key] if metric in r]
        labels = sorted({(r["model"], r["config"]) for r in rows}, key=lambda x: (x[0], -next(
            r["H_kv"] for r in rows if (r["model"], r["config"]) == x)))
        paths = sorted({r["path"] for r in rows})
        width = 0.8 / max(1, len(paths))
        for i, p in enumerate(paths):
            vals = [next((r[metric] for r in rows if (r["model"], r["config"]) == lab and r["path"] == p), 0)
                    for lab in labels]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"{m.split('-')[1]}\n{c}" for m, c in labels], fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"GQA vs MHA attention — {result['device']}, {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
