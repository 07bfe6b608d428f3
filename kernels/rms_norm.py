"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

transformers' order, which decides the rounding in fp16 / bf16: h = residual + x in the activation dtype;
normalize h in fp32; cast back to the activation dtype; *then* multiply by the weight (in the promoted
dtype). One program per row, the whole row in one block (hidden sizes up to 8192 for Qwen2-72B).
The references are `qwen2_pure.ops.rms_norm` and, with the residual, `qwen2_pure.ops.add_rms_norm`, which the
model's decoder layers call for every residual add.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def _rms_norm_fwd(X, RES, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, N, eps,
                  HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        h = (x + r).to(RES_OUT.dtype.element_ty)  # the sum is rounded to the activation dtype first
        tl.store(RES_OUT + row * stride_ro + cols, h, mask=ok)
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # cast back before the weight multiply
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (w * normed).to(OUT.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """weight * normalize(x) over the last dim; with `residual`: (rms_norm(x + residual), x + residual)."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, N)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, N)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2  # never read or written
    BLOCK = next_pow2(N)
    _rms_norm_fwd[(x2.shape[0],)](x2, r2, weight.contiguous(), out, res_out, x2.stride(0), r2.stride(0),
                                  out.stride(0), res_out.stride(0), N, eps, HAS_RES=residual is not None,
                                  BLOCK=BLOCK, num_warps=min(16, max(1, BLOCK // 256)))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))
