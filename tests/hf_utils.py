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


# Common English words: the chat checkpoint gives them large embedding rows so greedy text is varied words.
WORDS = ("the of and to in is it you that he was for on are with as his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after words "
         "called just where most know get through back much before go good new write our used me man too any day "
         "same right look think also around another came come work three word must because does part even place "
         "well").split()


def make_chat_checkpoint(path, tokenizer_dir, max_new_tokens):
    """A ~20 MB random tiny Qwen2 with a real tokenizer (the demo's files), whose greedy output is varied text.

    Common words get large embedding rows and the final norm's signs are flipped at random, so greedy decoding
    does not repeat one token; generation_config.json is the tokenizer's (greedy) plus `max_new_tokens`.
    """
    import json
    import shutil

    from qwen2_pure.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids: list[int] = []
    for w in WORDS:
        e = tok.encode(" " + w)
        if len(e) == 1 and e[0] not in ids:
            ids.append(e[0])
    model = make_hf_checkpoint(path, heads=2, kv_heads=1, head_dim=16, layers=1, tied=True, intermediate=64,
                               vocab=151936, seed=0, max_pos=256)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        emb = model.get_input_embeddings().weight
        emb[ids] = torch.randn(len(ids), emb.shape[1], generator=g)
        norm = model.model.norm.weight
        norm.mul_(torch.where(torch.rand(norm.shape, generator=g) < 0.5, -1.0, 1.0))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    gen = json.loads((tokenizer_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert "do_sample" not in gen  # the demo's file: greedy
    gen["max_new_tokens"] = max_new_tokens
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return path
