"""The few operations a faster backend may replace: RMSNorm (alone and after the residual add), RoPE,
attention, SwiGLU, and the linear product.

Each function here is the PyTorch reference, written in transformers' exact op order so that fp32 logits
match it bit for bit on CPU (and bf16 ones too, where the order decides the rounding). These are the only
references: the kernels' tests (tests/test_kernels.py) compare each kernel with the function here.

What runs is decided by a `Settings` object (`qwen2_pure.settings`) chosen when the model is loaded and
passed in by the model's modules; nothing here reads the environment. With `settings.kernels` "auto", CUDA
tensors take the Triton kernels of `qwen2_pure.kernels`; "torch" forces the references everywhere; "triton"
forces the kernels on any device (on a CPU that needs `TRITON_INTERPRET=1`, set before anything imports
triton: Triton's interpreter, for tests). The kernels have no backward, so a call that needs gradients always
takes the reference. triton is imported on first use, never at import time.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import Qwen2PureError
from .settings import DEFAULT, Settings

_native_bf16 = None  # whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), probed once


def native_bf16() -> bool:
    global _native_bf16
    if _native_bf16 is None:
        cpu = torch.cpu
        _native_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                            or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return _native_bf16


# rows (tokens) from which a bf16/fp16 product on a CPU without native bf16 runs as an fp32 GEMM instead
UPCAST_FROM_ROWS = 16


def upcasts(x: torch.Tensor, settings: Settings = DEFAULT) -> bool:
    """Whether `linear` widens this product to fp32 (see there): a CPU without bf16 instructions, fast mode,
    a bf16/fp16 input of at least UPCAST_FROM_ROWS rows, no gradients."""
    return (settings.fast and x.dtype in (torch.bfloat16, torch.float16) and not x.is_cuda
            and x.numel() >= UPCAST_FROM_ROWS * x.shape[-1] and not native_bf16() and not torch.is_grad_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           settings: Settings = DEFAULT) -> torch.Tensor:
    """F.linear, except for prompt-sized bf16/fp16 products on a CPU without bf16 instructions: there
    oneDNN emulates bf16 at ~1/6 of the fp32 GEMM rate, so the operands are widened to fp32 (exact) and
    the fp32 result rounded back, the accumulation being fp32 in both cases. Decode-sized products stay
    bf16: they are bound by reading the weight, and bf16 reads half the bytes."""
    if upcasts(x, settings):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)
    return F.linear(x, weight, bias)


_kernels = None  # qwen2_pure.kernels once imported, or the reason it cannot be (a string)


def load_kernels():
    """`qwen2_pure.kernels`, or a string saying why it cannot be imported."""
    global _kernels
    if _kernels is None:
        try:
            from . import kernels as mod
        except ImportError as e:
            mod = (f"the Triton kernels cannot be imported ({e}); install triton (pip install "
                   "'qwen2-pure[kernels]') and install the package (pip install -e .), which maps the repository's "
                   "kernels/ folder to qwen2_pure.kernels")
        _kernels = mod
    return _kernels


def check_kernels(settings: Settings, device: torch.device) -> None:
    """Called once when a model is configured: kernels asked for but not importable are an error
    (kernels="triton") or a warning ("auto" on CUDA), never a silent fallback."""
    wanted = settings.kernels == "triton" or (settings.kernels == "auto" and device.type == "cuda")
    mod = load_kernels() if wanted else None
    if isinstance(mod, str):
        if settings.kernels == "triton":
            raise Qwen2PureError(f"kernels='triton': {mod}")
        warnings.warn(f"kernels='auto' on {device}: {mod}; running the PyTorch references", stacklevel=3)


def _triton(settings: Settings, *tensors: torch.Tensor):
    """The kernels module when this call should run on Triton, else None."""
    if settings.kernels == "torch":
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if settings.kernels == "auto" and not tensors[0].is_cuda:
        return None
    mod = load_kernels()
    if isinstance(mod, str):
        if settings.kernels == "triton":
            raise Qwen2PureError(f"kernels='triton': {mod}")
        return None  # "auto": check_kernels warned when the model was configured
    return mod


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, settings: Settings = DEFAULT) -> torch.Tensor:
    k = _triton(settings, x, weight)
    if k:
        return k.rms_norm(x, weight, eps)
    # Normalize in fp32, cast back, *then* scale: multiplying in fp32 first moves bf16 logits by ~3e-2.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 settings: Settings = DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it: (h + delta, rms_norm(h + delta)). transformers' order: the
    sum is rounded to the activation dtype (`residual + hidden_states`), then normalized as `rms_norm` does.
    The Triton kernel does both in one pass over the row."""
    k = _triton(settings, h, delta, weight)
    if k and h.dtype == delta.dtype and h.shape == delta.shape:
        normed, h = k.rms_norm(delta, weight, eps, residual=h)
        return h, normed
    h = h + delta
    return h, rms_norm(h, weight, eps, settings)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # split-halves convention: (x1, x2) -> (-x2, x1). The interleaved (GPT-J / Meta) convention pairs
    # (x0, x1), (x2, x3) ... instead; HF-layout Qwen2 weights expect split halves, no q/k permutation.
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, settings: Settings = DEFAULT):
    # q (B, H_q, T, D), k (B, H_kv, T, D); cos, sin (B, T, D) -> broadcast over heads.
    # The Triton path rotates q and k in place (the model's are fresh projections nobody else reads).
    kern = _triton(settings, q, k)
    if kern and q.stride(-1) == 1 and k.stride(-1) == 1:
        return kern.rope_(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float,
              settings: Settings = DEFAULT) -> torch.Tensor:
    """Grouped-query attention: q (B, H_q, T, D), k/v (B, H_kv, S, D); `mask` an `AttentionMask`
    (`qwen2_pure.masks`, what the model passes) or an additive (B|1, 1, T, S) tensor.

    Instead of copying each KV head n_rep times (transformers' repeat_kv), the n_rep query heads of a
    group are stacked along the time axis and multiplied with their shared KV head: the same products,
    and K/V are read once per group. Query head j = g * n_rep + r belongs to group g = j // n_rep.
    """
    B, H_q, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    kern = _triton(settings, q, k, v)
    if kern and D in (16, 32, 64, 128, 256):
        return _triton_attention(kern, q, k, v, mask, scale)
    if mask is not None and not isinstance(mask, torch.Tensor):
        mask = mask.additive()  # the reference reads the dense mask, built as attention_mask_4d does
    if settings.fast and not q.is_cuda:  # PyTorch's fused CPU attention (flash-style, reads K/V once per group)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H_q != H_kv)
    n_rep = H_q // H_kv
    qg = q.reshape(B, H_kv, n_rep * T, D)  # (B, H_kv, n_rep*T, D)
    scores = torch.matmul(qg, k.transpose(2, 3)) * scale  # (B, H_kv, n_rep*T, S)
    scores = scores.view(B, H_kv, n_rep, T, S) + mask.unsqueeze(2)  # mask (B|1, 1, 1, T, S)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(B, H_kv, n_rep * T, S), v)  # (B, H_kv, n_rep*T, D)
    return out.view(B, H_q, T, D)


def _triton_attention(kern, q, k, v, mask, scale: float) -> torch.Tensor:
    """The mask as structure where it has one (`AttentionMask.structured`): causal at the query slots, the
    sliding window, each row's first real slot. A decode step (T = 1) reads slots [start, slot] of its
    row, start being the row's first real slot raised to the window's low edge; a prefill takes the flash
    kernel's causal path with those bounds. Only a mask without structure (a padding mask with holes, or a
    bare additive tensor) reaches the kernels dense: a decode step's row as key padding, a prefill's as a bias."""
    B, H_q, T, D = q.shape
    S = k.shape[2]
    if mask is not None and not isinstance(mask, torch.Tensor):
        if mask.structured:
            start = mask.kv_start  # (B,) or None
            if T == 1:
                pos = mask.slots[:1].to(torch.int32)  # (1,), stays on the device: no host sync
                seqlens = (pos + 1).expand(B)
                if mask.window is not None:
                    low = (pos - mask.window + 1).expand(B)
                    start = low if start is None else torch.maximum(start, low)
                return kern.decode_attention(q[:, :, 0], k, v, seqlens, scale, kv_start=start).unsqueeze(2)
            return kern.flash_attention(q, k, v, causal=True, sm_scale=scale, kv_start=start,
                                        window=mask.window, q_slots=mask.slots)
        mask = mask.additive()
    if T == 1:
        seqlens = torch.full((B,), S, dtype=torch.int32, device=q.device)
        keep = None if mask is None else (mask[:, 0, 0, :] == 0).expand(B, S)
        return kern.decode_attention(q[:, :, 0], k, v, seqlens, scale, key_padding=keep).unsqueeze(2)
    if mask is None:
        return kern.flash_attention(q, k, v, causal=True, sm_scale=scale)
    return kern.flash_attention(q, k, v, causal=False, sm_scale=scale, attn_bias=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor, settings: Settings = DEFAULT) -> torch.Tensor:
    k = _triton(settings, gate, up)
    if k:
        return k.swiglu(gate, up)
    return F.silu(gate) * up
