"""Prefill attention: FlashAttention-2 style, grouped-query native.

q (B, H_q, T, D), k and v (B, H_kv, S, D), H_q = G * H_kv; query head j reads KV head j // G.

One program owns BLOCK_M *packed rows* of one (batch, KV head): row m is token t = m // G of query head
kvh * G + m % G. The G query heads of a group are thus stacked in the M dimension (token-major) and every
K/V tile is loaded once for all of them, with no repeat_kv. Token-major packing keeps a block's tokens
contiguous, so the causal bound stays tight: a block reads keys [0, last token's position], and tiles
entirely visible to every row of the block go through a loop without masks.

Causal alignment is bottom-right (query t sits at position S - T + t), which is what a prefill that
continues a KV cache needs; for T = S it is the usual lower triangle; or the caller gives each query's slot.
The model's masks arrive as structure: a per-row first key slot (left padding) and a sliding window narrow
the key range a block visits (tiles wholly outside are skipped, edge tiles masked), so no T x S bias is read;
a dense additive bias stays available for masks nothing else expresses. Softmax runs in the log2 domain with
fp32 running max / sum / accumulator. Rows that see no key at all (left padding) come out as zeros.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import autotune, bucket, check_last_dim_contiguous, dot_precision, upcast

LOG2E = 1.4426950408889634

_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)]]


@triton.jit
def _tile(acc, l_i, m_i, q, K, V, BIAS, PAD, start_n, offs_d, q_pos, t, row_ok, k_base, v_base,
          stride_ks, stride_vs, bias_base, stride_bt, stride_bs, pad_base, S, qk_scale, kv_start, window,
          BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
          HAS_PAD: tl.constexpr, HAS_START: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
          DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    if MASKED:
        k = tl.load(K + k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(K + k_base + offs_n[None, :] * stride_ks + offs_d[:, None])  # (D, BLOCK_N)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_d[None, :])  # (BLOCK_N, D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
    if HAS_BIAS:
        b = tl.load(BIAS + bias_base + t[:, None] * stride_bt + offs_n[None, :] * stride_bs,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        qk += b.to(tl.float32) * 1.4426950408889634
    if HAS_PAD:
        keep = tl.load(PAD + pad_base + offs_n, mask=n_ok, other=0)
        qk = tl.where(keep[None, :] != 0, qk, float("-inf"))
    if MASKED:
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            valid = valid & (offs_n[None, :] > q_pos[:, None] - window)
        if HAS_START:
            valid = valid & (offs_n[None, :] >= kv_start)
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@autotune(_CONFIGS, triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1),
          key=["T_KEY", "S_KEY", "HEAD_DIM", "GROUP", "CAUSAL", "HAS_BIAS", "HAS_PAD", "HAS_START", "HAS_WINDOW"])
@triton.jit
def _flash_fwd(Q, K, V, O, BIAS, PAD, SLOTS, START,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
               stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_ot,
               stride_bb, stride_bt, stride_bs, stride_pb,
               H_kv, T, S, qk_scale, window, T_KEY, S_KEY,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_PAD: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_START: tl.constexpr, HAS_WINDOW: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_kv).to(tl.int64)
    kvh = (pid_bh % H_kv).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed: row = t * GROUP + r
    t = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = t < T
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_SLOTS:  # the query slots given: query t sits at slot SLOTS[t]
        q_pos = tl.load(SLOTS + t, mask=row_ok, other=0).to(tl.int32)
    else:  # bottom-right causal alignment
        q_pos = t + (S - T)
    pos_lo = tl.min(tl.where(row_ok, q_pos, S), 0)  # the block's lowest and highest query positions
    pos_hi = tl.max(tl.where(row_ok, q_pos, -1), 0)
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    bias_base = b * stride_bb
    pad_base = b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key range [lo, hi) some row of the block sees; [seen_lo, full_end) every row sees whole.
    if CAUSAL:
        hi = tl.minimum(pos_hi + 1, S)  # blocks above the diagonal are never visited
        full_end = (tl.maximum(tl.minimum(pos_lo + 1, S), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full_end = (S // BLOCK_N) * BLOCK_N
    lo = 0
    seen_lo = 0
    if HAS_START:  # keys before the row's first real slot (left padding) are never visited
        kv_start = tl.load(START + b).to(tl.int32)
        lo = kv_start
        seen_lo = kv_start
    else:
        kv_start = 0
    if HAS_WINDOW:  # nor keys that slid out of every row's window
        lo = tl.maximum(lo, pos_lo - window + 1)
        seen_lo = tl.maximum(seen_lo, pos_hi - window + 1)
    if HAS_START or HAS_WINDOW:
        lo = (tl.maximum(lo, 0) // BLOCK_N) * BLOCK_N
        seen_lo = tl.minimum(tl.cdiv(tl.maximum(seen_lo, 0), BLOCK_N) * BLOCK_N, hi)
    # the low edge (padding, window), masked
    for start_n in range(lo, seen_lo, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, K, V, BIAS, PAD, start_n, offs_d, q_pos, t, row_ok,
                              k_base, v_base, stride_ks, stride_vs, bias_base, stride_bt, stride_bs, pad_base,
                              S, qk_scale, kv_start, window, BLOCK_N, True, CAUSAL, HAS_BIAS, HAS_PAD,
                              HAS_START, HAS_WINDOW, UPCAST, DOT_PREC)
    # tiles every row of the block sees whole: no masks
    for start_n in range(seen_lo, full_end, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, K, V, BIAS, PAD, start_n, offs_d, q_pos, t, row_ok,
                              k_base, v_base, stride_ks, stride_vs, bias_base, stride_bt, stride_bs, pad_base,
                              S, qk_scale, kv_start, window, BLOCK_N, False, CAUSAL, HAS_BIAS, HAS_PAD,
                              HAS_START, HAS_WINDOW, UPCAST, DOT_PREC)
    # the diagonal band and the ragged tail
    for start_n in range(tl.maximum(seen_lo, full_end), hi, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, K, V, BIAS, PAD, start_n, offs_d, q_pos, t, row_ok,
                              k_base, v_base, stride_ks, stride_vs, bias_base, stride_bt, stride_bs, pad_base,
                              S, qk_scale, kv_start, window, BLOCK_N, True, CAUSAL, HAS_BIAS, HAS_PAD,
                              HAS_START, HAS_WINDOW, UPCAST, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be 4-D (B, H, T|S, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H_q, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"(B={B}, H_kv, S, D={D}) for q {tuple(q.shape)}")
    if H_q % k.shape[1]:
        raise ValueError(f"flash_attention: H_q={H_q} query heads is not a multiple of H_kv={k.shape[1]}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"flash_attention: head_dim {D} not supported (16, 32, 64, 128 or 256)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: Optional[float] = None, *, key_padding: Optional[torch.Tensor] = None,
                    attn_bias: Optional[torch.Tensor] = None, kv_start: Optional[torch.Tensor] = None,
                    window: Optional[int] = None, q_slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale [+ attn_bias]) v for q (B, H_q, T, D), k, v (B, H_kv, S, D) -> (B, H_q, T, D).

    The mask as structure (no T x S tensor is read):
    causal: query t sees keys s <= its position, S - T + t (bottom-right aligned; T <= S) or q_slots[t].
    q_slots: (T,) int, the key slot each query sits at (default bottom-right: S - T + t).
    kv_start: (B,) int, row b sees only keys s >= kv_start[b] (left padding; rows that start later).
    window: sliding window, with causal: query at position p sees keys s > p - window.
    And as tensors, where nothing above expresses the mask:
    key_padding: (B, S) with nonzero (True / 1) for real keys, 0 for padding.
    attn_bias: additive mask broadcastable to (B, 1, T, S), e.g. the model's (B|1, 1, T, S) mask with
        dtype-min where masked; it replaces none of the above (pass causal=False to rely on it alone).
    A query that sees no key at all gets zeros.
    """
    _check(q, k, v)
    B, H_q, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if causal and T > S and q_slots is None:
        raise ValueError(f"flash_attention: causal needs T <= S, got T={T}, S={S}")
    if window is not None and (not causal or window < 1):
        raise ValueError(f"flash_attention: window={window} needs causal=True and window >= 1")
    q, k, v = (check_last_dim_contiguous(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    o = torch.empty_like(q)
    if attn_bias is not None:
        if attn_bias.dim() != 4 or attn_bias.shape[1] != 1 or attn_bias.shape[0] not in (1, B):
            raise ValueError(f"flash_attention: attn_bias must be (B|1, 1, T, S), got {tuple(attn_bias.shape)}")
        bias = attn_bias.expand(B, 1, T, S)
        sbb = 0 if attn_bias.shape[0] == 1 else bias.stride(0)
        sbt, sbs = bias.stride(2), bias.stride(3)
    else:
        bias, sbb, sbt, sbs = q, 0, 0, 0  # never read
    if key_padding is not None:
        if key_padding.shape != (B, S):
            raise ValueError(f"flash_attention: key_padding must be (B={B}, S={S}), got {tuple(key_padding.shape)}")
        pad = key_padding.to(torch.int8) if key_padding.dtype == torch.bool else key_padding
        pad = pad if pad.stride(1) == 1 else pad.contiguous()
        spb = pad.stride(0)
    else:
        pad, spb = q, 0
    if q_slots is not None and q_slots.shape != (T,):
        raise ValueError(f"flash_attention: q_slots must be (T={T},), got {tuple(q_slots.shape)}")
    if kv_start is not None and kv_start.shape != (B,):
        raise ValueError(f"flash_attention: kv_start must be (B={B},), got {tuple(kv_start.shape)}")
    slots = q if q_slots is None else q_slots.to(device=q.device, dtype=torch.int32).contiguous()
    start = q if kv_start is None else kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    G = H_q // H_kv

    def grid(meta):
        return (triton.cdiv(T * G, meta["BLOCK_M"]), B * H_kv)

    _flash_fwd[grid](q, k, v, o, bias, pad, slots, start,
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                     sbb, sbt, sbs, spb, H_kv, T, S, sm_scale * LOG2E, window or 0, bucket(T), bucket(S),
                     GROUP=G, HEAD_DIM=D, CAUSAL=bool(causal), HAS_BIAS=attn_bias is not None,
                     HAS_PAD=key_padding is not None, HAS_SLOTS=q_slots is not None,
                     HAS_START=kv_start is not None, HAS_WINDOW=window is not None,
                     UPCAST=upcast(q.dtype), DOT_PREC=dot_precision(q.dtype))
    return o
