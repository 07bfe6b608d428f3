"""Tiny random transformers checkpoints for parity tests: built, perturbed and saved by transformers itself."""

from __future__ import annotations

import torch

VOCAB = 257


def make_hf_checkpoint(path, *, heads=14, kv_heads=2, head_dim=64, layers=2, tied=False, intermediate=96,
                       vocab=VOCAB, seed=0, max_pos=256, **extra):
    """Save a random Qwen2ForCausalLM with `heads` query heads of `head_dim` and `kv_heads` KV heads."""
    transformers = __import__("pytest").importorskip("transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=max_pos, tie_word_embeddings=tied, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=vocab - 2, **extra)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        # Perturb what initialization leaves at 0 or 1, so bias and norm code paths are really exercised,
        # and make the weights large enough that logits vary by several units.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return model


def load_hf(path, dtype=torch.float32, attn="eager"):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


def make_hf_moe_checkpoint(path, *, heads=14, kv_heads=2, head_dim=32, layers=2, tied=False, intermediate=64,
                           experts=8, top_k=3, moe_intermediate=32, shared_intermediate=48, vocab=VOCAB, seed=0,
                           max_pos=256, **extra):
    """Save a random Qwen2MoeForCausalLM (every layer MoE unless `decoder_sparse_step`/`mlp_only_layers` say so).

    transformers 5.x keeps experts fused in memory (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`)
    but `save_pretrained` writes the per-expert names of the official checkpoints (`experts.{e}.gate_proj` ...).
    """
    transformers = __import__("pytest").importorskip("transformers")
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6, max_position_embeddings=max_pos, tie_word_embeddings=tied, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 2, num_experts=experts, num_experts_per_tok=top_k,
        moe_intermediate_size=moe_intermediate, shared_expert_intermediate_size=shared_intermediate, **extra)
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # as in make_hf_checkpoint; the router gets weights too
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return model
