"""Where a decode step's time goes: torch profiler over cached decode steps, per op and weight shape.

    python benchmarks/profile_decode.py                         # demo model: bfloat16, int8, int4 (2 threads)
    python benchmarks/profile_decode.py --variants float32 bfloat16 --threads 2 --steps 16 --out prof.md

For each variant it prefills a 64-token prompt, runs a few decode steps to warm up, then profiles --steps
single-token steps. Each matrix product is reported with the bytes of its weight and the rate at which it
streamed them (GB/s), next to the machine's read bandwidth measured in the same run (sum of a 1 GiB tensor):
a product far below that line is bound by arithmetic (e.g. widening bf16 or int8 to fp32 on a CPU without
the instructions for it), not by memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import qwen2_pure as q

# the ops that read a weight, and where the weight sits among their inputs (aten::linear is only their caller)
WEIGHT_OPS = {"aten::mm": 1, "aten::addmm": 2, "aten::_weight_int8pack_mm": 1, "aten::_weight_int4pack_mm_for_cpu": 1}


def read_bandwidth(threads: int) -> float:
    x = torch.ones(256 << 20)  # 1 GiB of fp32
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def weight_bytes(name: str, shapes) -> int:
    """Bytes of the weight operand of a product, from the recorded input shapes."""
    if name == "aten::_weight_int8pack_mm":
        n, k = shapes[1]
        return n * k + 4 * n
    if name == "aten::_weight_int4pack_mm_for_cpu":
        n, k2 = shapes[1]
        return n * k2 + 2 * 2 * n * (2 * k2 // 32)
    return 0  # dense: bytes depend on the dtype, filled by the caller


def profile_variant(variant: str, steps: int) -> dict:
    dtype, _, quant = variant.partition(":")
    model = q.load_model(None, dtype=dtype, quantize=quant or None)
    cache = model.new_cache(1, 64 + steps + 8)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    with torch.inference_mode():
        model(torch.arange(1000, 1064)[None], cache=cache, input_pos=torch.arange(64), last_only=True)

        def step(i):
            model(torch.tensor([[1000 + i]]), cache=cache, input_pos=torch.tensor([64 + i]), last_only=True)

        for i in range(4):
            step(i)
        t0 = time.perf_counter()  # the wall time of a step, without the profiler's own overhead
        for i in range(4, 4 + steps):
            step(i)
        wall = (time.perf_counter() - t0) / steps
        cache = model.new_cache(1, 64 + steps + 8)
        model(torch.arange(1000, 1064)[None], cache=cache, input_pos=torch.arange(64), last_only=True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for i in range(4, 4 + steps):
                step(i)
    rows = defaultdict(lambda: [0.0, 0, 0])  # (op, weight shape) -> [seconds, calls, bytes per call]
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total / 1e6
        if e.key not in WEIGHT_OPS:
            continue
        shapes = e.input_shapes
        w = shapes[WEIGHT_OPS[e.key]] if len(shapes) > WEIGHT_OPS[e.key] else None
        if not w or len(w) != 2:
            continue
        nbytes = weight_bytes(e.key, shapes) or w[0] * w[1] * itemsize
        key = (e.key, tuple(w))
        rows[key][0] += e.self_cpu_time_total / 1e6
        rows[key][1] += e.count
        rows[key][2] = nbytes
    products = sorted(((op, shape, sec / steps, calls // steps, nbytes) for (op, shape), (sec, calls, nbytes)
                       in rows.items()), key=lambda r: -r[2])
    return {"variant": variant, "step_s": wall, "profiled_s": total / steps, "products": products,
            "top_ops": [(e.key, e.self_cpu_time_total / 1e6 / steps, e.count // steps)
                        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["bfloat16", "bfloat16:int8", "bfloat16:int4"],
                    help="dtype, or dtype:int8 / dtype:int4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = read_bandwidth(torch.get_num_threads())
    lines = [f"{time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"read bandwidth {bw:.1f} GB/s (sum of 1 GiB)", ""]
    for variant in args.variants:
        r = profile_variant(variant, args.steps)
        in_products = sum(p[2] for p in r["products"])
        lines += [f"### {variant}: {1 / r['step_s']:.2f} tok/s ({1000 * r['step_s']:.1f} ms a step; "
                  f"weight products {1000 * in_products:.1f} ms = {100 * in_products / r['step_s']:.0f}%)", "",
                  "| op | weight | calls/step | ms/step | MB/call | GB/s | % of read bandwidth |",
                  "|---|---|---|---|---|---|---|"]
        for op, shape, sec, calls, nbytes in r["products"]:
            rate = nbytes * calls / sec / 1e9 if sec else 0.0
            lines.append(f"| {op} | {list(shape)} | {calls} | {1000 * sec:.2f} | {nbytes / 1e6:.2f} | {rate:.1f} | "
                         f"{100 * rate / bw:.0f}% |")
        lines += ["", f"all ops, profiled: {1000 * r['profiled_s']:.1f} ms a step (the profiler adds its own); "
                  "top ops by self time: " + ", ".join(f"{k} {1000 * t:.1f} ms ({c} calls)" for k, t, c in r["top_ops"]), ""]
        print("\n".join(lines[-(len(r['products']) + 4):]), file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
