"""The few operations a faster backend may replace: RMSNorm, RoPE, attention, SwiGLU.

Each function here is the PyTorch reference, written in transformers' exact op order so that fp32
logits match it bit for bit on CPU (and bf16 ones too, where the order decides the rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in fp32, cast back, *then* scale: multiplying in fp32 first moves bf16 logits by ~3e-2.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # split-halves convention: (x1, x2) -> (-x2, x1). The interleaved (GPT-J / Meta) convention pairs
    # (x0, x1), (x2, x3) ... instead; HF-layout Qwen2 weights expect split halves, no q/k permutation.
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q (B, H_q, T, D), k (B, H_kv, T, D); cos, sin (B, T, D) -> broadcast over heads
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention: q (B, H_q, T, D), k/v (B, H_kv, S, D), additive mask (B|1, 1, T, S).

    Instead of copying each KV head n_rep times (transformers' repeat_kv), the n_rep query heads of a
    group are stacked along the time axis and multiplied with their shared KV head: the same products,
    and K/V are read once per group. Query head j = g * n_rep + r belongs to group g = j // n_rep.
    """
    B, H_q, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    n_rep = H_q // H_kv
    qg = q.reshape(B, H_kv, n_rep * T, D)  # (B, H_kv, n_rep*T, D)
    scores = torch.matmul(qg, k.transpose(2, 3)) * scale  # (B, H_kv, n_rep*T, S)
    scores = scores.view(B, H_kv, n_rep, T, S) + mask.unsqueeze(2)  # mask (B|1, 1, 1, T, S)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(B, H_kv, n_rep * T, S), v)  # (B, H_kv, n_rep*T, D)
    return out.view(B, H_q, T, D)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
