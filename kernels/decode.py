"""Decode attention over a static KV cache: one new token per sequence, split-KV (flash-decoding).

q (B, H_q, D), k_cache / v_cache (B, H_kv, S_max, D), cache_seqlens (B,): sequence b attends to slots
[kv_start[b], cache_seqlens[b]) (kv_start default 0; with key_padding, only to the real ones among them).

Stage 1, grid (B, H_kv, splits): a program takes the G query heads of one KV head as the rows of a
(BLOCK_H, D) tile (BLOCK_H = max(16, next_pow2(G)), the smallest M a GPU `tl.dot` takes), streams its
slice of the sequence once for all of them, and writes each head's partial output and log-sum-exp (log2
domain). Splits past a sequence's end write lse = -inf. Stage 2, grid (B, H_q), merges the splits with
weights exp2(lse - max lse). Decode is bandwidth-bound: a K/V byte is read once per group, so GQA decode
costs 1/G of multi-head decode at the same H_q.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune, bucket, check_last_dim_contiguous, dot_precision, next_pow2, upcast

LOG2E = 1.4426950408889634

_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(64, 4, 2), (32, 4, 2), (128, 8, 3)]]


@autotune(_CONFIGS, triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1),
          key=["S_KEY", "SPLIT_KEY", "HEAD_DIM", "GROUP", "HAS_PAD", "HAS_START"])
@triton.jit
def _decode_split(Q, K, V, SEQLENS, PAD, START, O_PART, LSE_PART,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  stride_pb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  H_kv, split_len, qk_scale, S_KEY, SPLIT_KEY,
                  GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
                  HAS_START: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_H)
    h_ok = r < GROUP
    head = kvh * GROUP + r
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=h_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    seqlen = tl.load(SEQLENS + b)
    start = split * split_len
    end = tl.minimum(start + split_len, seqlen)
    if HAS_START:  # slots before the row's first real one (left padding, a window) are never read
        start = tl.maximum(start, tl.load(START + b))

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = tl.load(K + k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale  # (BLOCK_H, BLOCK_N)
        if HAS_PAD:
            keep = tl.load(PAD + b * stride_pb + offs_n, mask=n_ok, other=0)
            n_ok = n_ok & (keep != 0)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(O_PART + b * stride_ob + head[:, None] * stride_oh + split * stride_os + offs_d[None, :],
             acc / l_safe[:, None], mask=h_ok[:, None])
    tl.store(LSE_PART + b * stride_lb + head * stride_lh + split, lse, mask=h_ok)


@triton.jit
def _decode_merge(O_PART, LSE_PART, O, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                  H_q, n_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H_q).to(tl.int64)
    h = (pid % H_q).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # empty splits weigh 0
    part = tl.load(O_PART + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


_SM_COUNT: dict = {}


def _num_splits(B: int, H_kv: int, S_max: int, device: torch.device) -> int:
    """Enough (batch, KV head, split) programs to fill the GPU twice over, each split >= 256 slots."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(4, triton.cdiv(S_max, 32)))
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * _SM_COUNT[device], B * H_kv)
    return max(1, min(want, triton.cdiv(S_max, 256), 128))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     sm_scale: Optional[float] = None, *, key_padding: Optional[torch.Tensor] = None,
                     kv_start: Optional[torch.Tensor] = None, num_splits: Optional[int] = None) -> torch.Tensor:
    """Attention of one query token per sequence: q (B, H_q, D), caches (B, H_kv, S_max, D) -> (B, H_q, D).

    cache_seqlens (B,) int: sequence b reads slots [0, cache_seqlens[b]); a sequence of length 0 gets zeros.
    kv_start (B,) int: sequence b reads only slots >= kv_start[b] (left padding, rows that start later on the
        slot axis, a sliding window's low edge); nothing to read gives zeros.
    key_padding (B, S_max), nonzero for real slots: masks left padding inside that range.
    num_splits: how many slices of the sequence run in parallel (default: enough to fill the GPU).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: q must be (B, H_q, D) and k_cache, v_cache (B, H_kv, S_max, D); got "
                         f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    B, H_q, D = q.shape
    _, H_kv, S_max, _ = k_cache.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or H_q % H_kv:
        raise ValueError(f"decode_attention: k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} "
                         f"(B, D must match and H_q a multiple of H_kv)")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"decode_attention: head_dim {D} not supported (16, 32, 64, 128 or 256)")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"decode_attention: cache_seqlens must be (B={B},), got {tuple(cache_seqlens.shape)}")
    q, k_cache, v_cache = (check_last_dim_contiguous(n, x) for n, x in (("q", q), ("k", k_cache), ("v", v_cache)))
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if key_padding is not None:
        if key_padding.shape != (B, S_max):
            raise ValueError(f"decode_attention: key_padding must be (B={B}, S_max={S_max}), "
                             f"got {tuple(key_padding.shape)}")
        pad = (key_padding.to(torch.int8) if key_padding.dtype == torch.bool else key_padding).contiguous()
        spb = pad.stride(0)
    else:
        pad, spb = seqlens, 0  # never read
    if kv_start is not None:
        if kv_start.shape != (B,):
            raise ValueError(f"decode_attention: kv_start must be (B={B},), got {tuple(kv_start.shape)}")
        start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    else:
        start = seqlens  # never read
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    G = H_q // H_kv
    splits = num_splits or _num_splits(B, H_kv, S_max, q.device)
    split_len = triton.cdiv(S_max, splits)
    o_part = torch.empty(B, H_q, splits, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, H_q, splits, dtype=torch.float32, device=q.device)
    _decode_split[(B, H_kv, splits)](
        q, k_cache, v_cache, seqlens, pad, start, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), spb,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        H_kv, split_len, sm_scale * LOG2E, bucket(S_max), bucket(split_len),
        GROUP=G, BLOCK_H=max(16, next_pow2(G)), HEAD_DIM=D, HAS_PAD=key_padding is not None,
        HAS_START=kv_start is not None, UPCAST=upcast(q.dtype), DOT_PREC=dot_precision(q.dtype))
    o = torch.empty_like(q)
    _decode_merge[(B * H_q,)](o_part, lse_part, o, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                              lse_part.stride(0), lse_part.stride(1), o.stride(0), o.stride(1), H_q, splits,
                              HEAD_DIM=D, BLOCK_S=next_pow2(splits), num_warps=4)
    return o
