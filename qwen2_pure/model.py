"""The Qwen2 decoder, top to bottom.

Architecture facts (Qwen2 / Qwen2.5 dense, `Qwen2ForCausalLM`; reference: transformers `modeling_qwen2.py`,
and `modeling_qwen2_moe.py` for the mixture of experts):
- pre-norm decoder: h += o_proj(attn(RMSNorm(h))); h += mlp(RMSNorm(h)); logits = lm_head(RMSNorm(h))
- RMSNorm computes in fp32 and casts back to the activation dtype *before* the multiply by its weight
- RoPE: split-halves ("rotate_half") convention, inv_freq = theta^(-2i/D) in fp32 (theta = 1e6 in every
  official checkpoint), cos/sin computed in fp32 and cast to the activation dtype
- grouped-query attention: H_q query heads share H_kv key/value heads, query head j reads KV head j // n_rep;
  q_proj, k_proj and v_proj carry a bias, o_proj does not; scale 1/sqrt(D); softmax in fp32
- SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases
- Qwen2-MoE (`qwen2_moe`, e.g. 57B-A14B) swaps the MLP of the layers `config.is_moe_layer(i)` names for a
  sparse block: a router softmax over *all* experts in fp32, the top-k weights used as they are (no
  renormalization unless `norm_topk_prob`), plus an always-on shared expert scaled by sigmoid(gate(x));
  q/k/v biases follow `qkv_bias`
- no embedding scaling; lm_head tied to embed_tokens for the small sizes (`tie_word_embeddings`)
- optional sliding-window attention on layers >= max_window_layers (off in every official checkpoint)

Shapes: B batch, T new tokens, S keys visible (cache length), H_q / H_kv heads, D head_dim, n_rep = H_q // H_kv;
N = B*T tokens, E experts, k experts per token.
Parameter names are Hugging Face's, so a checkpoint loads as an identity map and peft names line up.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import KVCache
from .config import GenerationConfig, Qwen2Config
from .errors import Qwen2PureError
from .masks import AttentionMask, run_starts
from .settings import DEFAULT, Settings


class Linear(nn.Linear):
    """nn.Linear through `ops.linear` (the same product; on CPUs without bf16 instructions a prompt-sized
    bf16 one runs as an fp32 GEMM). The parameters, their names and `isinstance(m, nn.Linear)` are unchanged."""

    settings: Settings = DEFAULT  # set per instance by Qwen2ForCausalLM.configure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.settings)


class RMSNorm(nn.Module):
    settings: Settings = DEFAULT

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.settings)


def rope_frequencies(cfg: Qwen2Config) -> tuple[torch.Tensor, float]:
    """inv_freq (D/2,) in fp32 and the factor cos/sin are multiplied by, per `rope_scaling`.

    default: theta^(-2i/D). linear: positions divided by `factor`. yarn (what Qwen2's model cards configure
    for 128K: factor 4 over an original 32768): high frequencies (dims that rotate more than beta_fast times
    over the original context) stay as they are, low ones (fewer than beta_slow rotations) are interpolated
    by `factor`, a linear ramp blends the dims between; cos/sin are scaled by 0.1 ln(factor) + 1 to keep
    attention entropy in check (transformers 5.x `_compute_yarn_parameters`).
    """
    d, base = cfg.head_dim, cfg.rope_theta
    dims = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    inv_freq = 1.0 / (base ** dims)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind != "yarn":
        return inv_freq, 1.0
    factor = rs["factor"]
    original = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):  # the dim whose wavelength fits `rotations` times in the original context
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2, device="cpu").float() / d)
    extrapolate = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency ones (interpolated)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed on the fly in fp32.

    inv_freq is a plain attribute, not a buffer, on purpose: `model.to(torch.bfloat16)` would cast a
    buffer to bf16 and move every logit by ~3e-2 (transformers' own `.to()` trap). It stays fp32.
    """

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.inv_freq, self.attention_scaling = rope_frequencies(cfg)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids: (B, T) -> cos, sin: (B, T, D)
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = (self.inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): the two halves share frequencies
            cos, sin = emb.cos(), emb.sin()
            if self.attention_scaling != 1.0:
                cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
            return cos.to(dtype), sin.to(dtype)


class Attention(nn.Module):
    settings: Settings = DEFAULT

    def __init__(self, cfg: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache], input_pos, kv_len: int):
        B, T, _ = x.shape
        # (B, T, H*D) -> (B, H, T, D): the biases are added before RoPE, as in the reference
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = ops.apply_rope(q, k, cos, sin, self.settings)
        if cache is not None:  # write the new keys at their slots, read back slots [0, kv_len)
            k, v = cache.update(self.layer_idx, input_pos, k, v, kv_len)  # (B, H_kv, S, D)
        out = ops.attention(q, k, v, mask, self.head_dim ** -0.5, self.settings)  # (B, H_q, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: the dense layer's MLP, and each expert (and the shared expert) of a MoE layer."""

    settings: Settings = DEFAULT

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), self.settings))


class SparseMoeBlock(nn.Module):
    """Qwen2-MoE's MLP: each token's k chosen experts, weighted by the router, plus a gated shared expert.

    Experts are separate `MLP`s named as on disk (`experts.{e}.gate_proj`, ...), so loading stays an
    identity map. Op order is transformers': routing weights are cast to the activation dtype, each
    expert's output is scaled and then index_add-ed into zeros, experts in ascending order, an expert's
    tokens gathered by pick then token. (CPU matmuls round a row differently depending on where it sits
    in the batch; in this order fp32 logits equal transformers' eager experts bit for bit.)
    """

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x):
        B, T, H = x.shape
        x = x.view(B * T, H)  # (N, H): routing is per token
        # softmax over all E experts, then keep the k largest: without renormalization they sum to < 1
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # only the experts some token chose (sorted ascending)
            slot, token = torch.where(chosen.T == e)  # (n_e,) each: which token chose e, as its slot-th pick
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_idx: int):
        super().__init__()
        self.window = cfg.layer_window(layer_idx)
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, masks, cache, input_pos, kv_len):
        """h: the residual stream (B, T, H), or the pair (h, delta) with the previous layer's MLP output not yet
        added. Returns that pair for this layer: each residual add runs fused with the norm that reads its sum
        (`ops.add_rms_norm`: h + delta, then the norm, transformers' order); the last one with the final norm."""
        norm = self.input_layernorm
        if isinstance(h, tuple):
            h, x = ops.add_rms_norm(*h, norm.weight, norm.eps, norm.settings)
        else:  # the first layer: the embeddings
            x = norm(h)
        attn = self.self_attn(x, cos, sin, masks[self.window], cache, input_pos, kv_len)
        norm = self.post_attention_layernorm
        h, x = ops.add_rms_norm(h, attn, norm.weight, norm.eps, norm.settings)
        return h, self.mlp(x)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


def attention_mask_4d(slots: torch.Tensor, kv_len: int, padding: Optional[torch.Tensor],
                      window: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B or 1, 1, T, S): 0 where query slot t may read key slot s, dtype-min elsewhere.

    Key s is visible from query slot q iff s <= q (causal), s > q - window (sliding window: the window
    counts the current token) and s is not padding. Slots are cache positions, not RoPE positions: with
    left padding they differ, and transformers masks by slot too.
    """
    keys = torch.arange(kv_len, device=slots.device)
    visible = keys[None, :] <= slots[:, None]  # (T, S)
    if window is not None:
        visible = visible & (keys[None, :] > slots[:, None] - window)
    visible = visible[None, None]  # (1, 1, T, S)
    if padding is not None:
        visible = visible & padding[:, None, None, :kv_len].bool()  # (B, 1, T, S)
    zero = torch.zeros((), dtype=dtype, device=slots.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


class Qwen2ForCausalLM(nn.Module):
    settings: Settings = DEFAULT  # how the ops compute (`configure`); the library's defaults until then

    def __init__(self, cfg: Qwen2Config, generation_config: Optional[GenerationConfig] = None):
        super().__init__()
        self.config = cfg
        # what ends a generation and how to sample by default: generation_config.json when loaded from a
        # checkpoint, else config.json's eos ids and transformers' defaults (a model built here and a loaded
        # one without that file behave the same)
        self.generation_config = generation_config or GenerationConfig.from_dict({}, cfg)
        self.model = Qwen2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one tensor between embed_tokens and lm_head when the config says so (re-run after loading)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not a quantized head
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """A static KV cache for `batch_size` sequences of up to `max_len` tokens (prompt + new)."""
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise Qwen2PureError(f"max_len={max_len} exceeds the model's context "
                                 f"(max_position_embeddings={cfg.max_position_embeddings})")
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                       dtype=dtype or self.dtype, device=self.device)

    def configure(self, settings: Settings) -> "Qwen2ForCausalLM":
        """Choose how every op of this model computes (`qwen2_pure.settings`); returns the model.
        Kernels asked for but not importable fail (or warn, for "auto" on CUDA) here, not at the first op."""
        if not isinstance(settings, Settings):
            raise Qwen2PureError(f"settings must be a qwen2_pure.Settings, got {type(settings).__name__}")
        ops.check_kernels(settings, self.device)
        self.settings = settings
        for m in self.modules():  # the modules that call ops: Linear, RMSNorm, Attention, MLP, and this one
            if hasattr(m, "settings"):
                m.settings = settings
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, *, cache: Optional[KVCache] = None,
                input_pos: Optional[torch.Tensor] = None, kv_len: Optional[int] = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) — or (B, 1, vocab) with `last_only` — for `input_ids` (B, T).

        attention_mask: (B, S) with 1 for real tokens and 0 for (left) padding, over the key slots the call
            reads (at least [0, kv_len)), this call's tokens included. When given without position_ids,
            RoPE positions count real tokens only (mask.cumsum - 1), so a left-padded row gives the logits of
            the unpadded one.
        position_ids: (B, T) RoPE positions; default: the slots (0.. without a cache, input_pos with one).
        cache, input_pos: a KVCache and the slots (T,) this call writes, e.g. arange(T) for a prefill
            and tensor([t]) for the decode step of token t. Without a cache the call is a full forward.
        kv_len: the cache slots attention reads, [0, kv_len) (int). The caller knows it (the generation
            engine does): given, nothing waits for a tensor's value. None reads it from input_pos (last + 1),
            a host sync. A compiled decode step passes the cache's whole length, so that shapes never change
            from one step to the next: slots after the query are hidden by the causal mask.
        """
        B, T = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device)
        if kv_len is None:
            kv_len = int(input_pos[-1]) + 1 if cache is not None else T
        if position_ids is None:
            if attention_mask is not None:
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.masked_fill(attention_mask == 0, 1)[:, input_pos]
            else:
                position_ids = input_pos[None, :].expand(B, T)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)
        # one mask per distinct window (None = full attention), shared by the layers using it: as structure
        # for the Triton kernels, plus the additive tensor when the PyTorch reference will read it
        kernels = ops._triton(self.settings, h) is not None and not torch.is_grad_enabled()
        starts = None
        if kernels and attention_mask is not None:  # per-row first real slot; the check is a sync, skipped
            check = not (torch.compiler.is_compiling()  # in a compiled step or a CUDA-graph capture
                         or (h.is_cuda and torch.cuda.is_current_stream_capturing()))
            starts = run_starts(attention_mask, input_pos, kv_len, check)
        masks = {}
        for w in {layer.window for layer in self.model.layers}:
            m = AttentionMask(input_pos, kv_len, w, attention_mask, starts, h.dtype, attention_mask_4d)
            if not (kernels and m.structured):
                m.bias = m.additive()
            masks[w] = m
        for layer in self.model.layers:
            h = layer(h, cos, sin, masks, cache, input_pos, kv_len)
        h, delta = h  # the last layer's residual stream and MLP output, added in the final norm
        if last_only:
            h, delta = h[:, -1:], delta[:, -1:]
        norm = self.model.norm
        return self.lm_head(ops.add_rms_norm(h, delta, norm.weight, norm.eps, norm.settings)[1])
