"""Rotary position embedding applied in place to q and k (split-halves / rotate_half convention).

q (B, H_q, T, D) and k (B, H_kv, T, D), any strides with a contiguous last dim (the model's q and k are
transposed views of the projections); cos, sin (B, T, D). One program per (b, t): cos/sin are loaded once
and applied to every query and key head of that token. Each product is rounded to the activation dtype
before the sum, as `q * cos + rotate_half(q) * sin` does, so fp16 / bf16 results equal the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def _rotate(X, base, stride_h, H, c1, c2, s1, s2, offs_h, offs_d, HALF: tl.constexpr):
    ok = (offs_h < H)[:, None] & (offs_d < HALF)[None, :]
    p1 = X + base + offs_h[:, None] * stride_h + offs_d[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=ok, other=0.0).to(tl.float32)
    dt = X.dtype.element_ty
    # out1 = x1*cos1 + (-x2)*sin1 ; out2 = x2*cos2 + x1*sin2, each product rounded like the reference's
    o1 = (x1 * c1[None, :]).to(dt).to(tl.float32) - (x2 * s1[None, :]).to(dt).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    tl.store(p1, o1.to(dt), mask=ok)
    tl.store(p2, o2.to(dt), mask=ok)


@triton.jit
def _rope_fwd(Q, K, COS, SIN, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_cb, stride_ct, stride_sb, stride_st, T, H_q, H_kv,
              HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HALF
    cb = COS + b * stride_cb + t * stride_ct
    sb = SIN + b * stride_sb + t * stride_st
    c1 = tl.load(cb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cb + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sb + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    _rotate(Q, b * stride_qb + t * stride_qt, stride_qh, H_q, c1, c2, s1, s2, tl.arange(0, BLOCK_HQ), offs_d, HALF)
    _rotate(K, b * stride_kb + t * stride_kt, stride_kh, H_kv, c1, c2, s1, s2, tl.arange(0, BLOCK_HK), offs_d, HALF)


def _check(q, k, cos, sin):
    B, H_q, T, D = q.shape
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"rope_: k {tuple(k.shape)} must be (B={B}, H_kv, T={T}, D={D}) for q {tuple(q.shape)}")
    if cos.shape != (B, T, D) or sin.shape != (B, T, D):
        raise ValueError(f"rope_: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be (B={B}, T={T}, D={D})")
    if D % 2:
        raise ValueError(f"rope_: head_dim {D} must be even")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope_: q and k must have a contiguous last dim (they are rotated in place)")


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, H_q, T, D) and k (B, H_kv, T, D) in place by cos, sin (B, T, D); returns (q, k)."""
    _check(q, k, cos, sin)
    B, H_q, T, D = q.shape
    H_kv = k.shape[1]
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    _rope_fwd[(B * T,)](q, k, cos, sin, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                        k.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), T, H_q, H_kv,
                        HALF=D // 2, BLOCK_D=next_pow2(D // 2), BLOCK_HQ=next_pow2(H_q), BLOCK_HK=next_pow2(H_kv),
                        num_warps=4)
    return q, k
