"""Time the elementwise / row kernels (RMSNorm + residual, RoPE, SwiGLU) against their PyTorch references
at Qwen2-7B shapes on a GPU; prints a table, writes kernels.json to the folder given (default benchmarks/out).
GB/s counts the bytes each op must read and write once."""

import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

import qwen2_pure.kernels as K
from qwen2_pure import ops
from qwen2_pure.settings import Settings

TORCH = Settings(kernels="torch")  # the PyTorch references of qwen2_pure.ops


def main(out="benchmarks/out"):
    if not torch.cuda.is_available():
        sys.exit("kernels_timing.py times the Triton kernels on a CUDA GPU and none is available here; "
                 "on a CPU, tests/test_kernels.py checks them through Triton's interpreter")
    dev, dt, N = "cuda", torch.bfloat16, 4096  # tokens
    H, I, hq, hkv, D = 3584, 18944, 28, 4, 128
    x, r = torch.randn(N, H, device=dev, dtype=dt), torch.randn(N, H, device=dev, dtype=dt)
    w = torch.rand(H, device=dev, dtype=dt) + 0.5
    g, u = torch.randn(N, I, device=dev, dtype=dt), torch.randn(N, I, device=dev, dtype=dt)
    q = torch.randn(1, N, hq, D, device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(1, N, hkv, D, device=dev, dtype=dt).transpose(1, 2)
    ang = torch.rand(1, N, D, device=dev)
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    e = 2
    cases = {
        "rms_norm+residual": (lambda: K.rms_norm(x, w, 1e-6, residual=r),
                              lambda: ops.add_rms_norm(r, x, w, 1e-6, TORCH), 4 * N * H * e),
        "rope_ (q and k)": (lambda: K.rope_(q, k, cos, sin), lambda: ops.apply_rope(q, k, cos, sin, TORCH),
                            2 * N * (hq + hkv) * D * e + 2 * N * D * e),
        "swiglu": (lambda: K.swiglu(g, u), lambda: ops.swiglu(g, u, TORCH), 3 * N * I * e),
    }
    rows = []
    print(f"{'kernel':<20} {'triton us':>10} {'torch us':>10} {'speed-up':>9} {'triton GB/s':>12}")
    for name, (tri, ref, nbytes) in cases.items():
        t_tri = do_bench(tri, return_mode="median") * 1e3
        t_ref = do_bench(ref, return_mode="median") * 1e3
        rows.append({"kernel": name, "triton_us": t_tri, "torch_us": t_ref, "speedup": t_ref / t_tri,
                     "triton_GBps": nbytes / t_tri / 1e3})
        print(f"{name:<20} {t_tri:>10.1f} {t_ref:>10.1f} {t_ref / t_tri:>8.2f}x {nbytes / t_tri / 1e3:>12.0f}")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "kernels.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "tokens": N,
                                                        "dtype": "bfloat16", "rows": rows}, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
