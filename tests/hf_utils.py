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


# ---- tolerances measured on the machine that runs the test ----------------------------------------------------
# Two computations that are the same in exact arithmetic (a padded row and the row alone, a cached decode and
# the full forward, SDPA and eager attention) differ in fp32/bf16 by however the CPU's kernels block their sums
# for the shapes at hand (0 or 8e-5 apart on one Xeon, by shape and ISA), for transformers as for us. So a test
# never states a tolerance: it measures transformers' own distance for the same pair here and bounds ours by it.

def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_within_reference(ours_a, ours_b, ref_a, ref_b, *, what, factor=4.0, floor_ulps=4):
    """Assert max|ours_a - ours_b| <= max(factor * max|ref_a - ref_b|, floor), and return both distances.

    ours_a/ours_b: our two computations that should agree; ref_a/ref_b: the reference's same pair on the same
    inputs and machine (transformers', or e.g. the exact product rounded once, for a kernel). The floor,
    `floor_ulps` fp32 units in the last place of the largest |ref_a|, lets a pair that is exact in transformers
    be a few roundings apart in ours (other GEMM shapes).
    `factor` > 1 because our shapes (grouped heads, static cache slots) are not transformers', so our rounding
    noise is of the same size, not the same numbers. A real bug (a wrong mask, position or slot) moves logits
    by whole units, orders of magnitude above this bound."""
    ours, ref = max_diff(ours_a, ours_b), max_diff(ref_a, ref_b)
    assert_distance_within(ours, ref, ref_a.float().abs().max().item(), what=what, factor=factor,
                           floor_ulps=floor_ulps)
    return ours, ref


def assert_distance_within(ours: float, ref: float, magnitude: float, *, what, factor=4.0, floor_ulps=4):
    """`assert_within_reference` for distances already measured; `magnitude`: the largest |value| compared."""
    floor = floor_ulps * torch.finfo(torch.float32).eps * magnitude
    bound = max(factor * ref, floor)
    assert ours <= bound, (f"{what}: our distance {ours:.3g} > {bound:.3g} = max({factor:g} x the reference's "
                           f"distance {ref:.3g} for the same pair on this machine, floor {floor:.3g})")


def grouped_gemms_exact(heads: int, kv_heads: int, head_dim: int, batch: int, length: int,
                        dtype=torch.float32) -> bool:
    """Whether this machine's GEMMs give the same bits for our grouped attention products ((B, H_kv, n_rep*T, D)
    @ (B, H_kv, D, T), then the probabilities @ V) as for transformers' per-head ones after repeat_kv. They do
    with MKL's AVX-512 and oneDNN kernels; MKL's AVX2 sgemm (an AVX2-only CPU, or MKL_ENABLE_INSTRUCTIONS=AVX2)
    blocks by rows and rounds them up to ~1e-5 apart for some shapes: there bit-for-bit parity is not real."""
    g = torch.Generator().manual_seed(0)
    n, B, T, D = heads // kv_heads, batch, length, head_dim
    q = torch.randn(B, heads, T, D, generator=g).to(dtype)
    k, v = (torch.randn(B, kv_heads, T, D, generator=g).to(dtype) for _ in range(2))
    p = torch.rand(B, heads, T, T, generator=g).to(dtype)
    theirs = (q @ k.repeat_interleave(n, 1).transpose(2, 3), p @ v.repeat_interleave(n, 1))
    ours = ((q.reshape(B, kv_heads, n * T, D) @ k.transpose(2, 3)).view(B, heads, T, T),
            (p.reshape(B, kv_heads, n * T, T) @ v).view(B, heads, T, D))
    return all(torch.equal(a, b) for a, b in zip(ours, theirs))


def assert_same_op_order(ours, ref, other, *, model, ids, what):
    """Ours against transformers' eager attention, which our exact mode follows op for op: bit for bit wherever
    this machine's GEMMs round our grouped-head shapes as transformers' per-head ones (`grouped_gemms_exact`, for
    the input `ids` (B, T) and `model`'s heads). Where they do not, or where `model` runs the fast paths
    (QWEN2_PURE_FAST=1: SDPA), ours must be no further from transformers' eager logits than transformers' own
    SDPA ones are: `other()` returns those (the same positions as `ref`)."""
    cfg, (B, T) = model.config, ids.shape
    if not model.settings.fast and grouped_gemms_exact(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                                       B, T, ours.dtype):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0, msg=lambda m: f"{what}, same op order: {m}")
    else:
        why = "fast mode" if model.settings.fast else "this machine's GEMMs round by shape"
        assert_within_reference(ours, ref, other(), ref, what=f"{what} ({why})")


def _cache_kwarg(hf) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # 5.x renamed it


def hf_cached_logits(hf, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """transformers' logits for `x` (B, T) from a prefill of `prefill` tokens then one cached step per token."""
    out = hf(x[:, :prefill], use_cache=True)
    logits = [out.logits]
    for t in range(prefill, x.shape[1]):
        out = hf(x[:, t:t + 1], use_cache=True, **{_cache_kwarg(hf): out.past_key_values})
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def hf_step_logits(hf, prompt: torch.Tensor, mask: torch.Tensor, step: torch.Tensor, static_len=None):
    """transformers' logits for one decode step `step` (B, 1) after a prefill of `prompt` (B, T), with the
    2-D `mask` (B, T + 1) (left padding allowed): through a StaticCache of `static_len` slots, or a DynamicCache."""
    import transformers
    B, T = prompt.shape
    cache = (transformers.DynamicCache() if static_len is None
             else transformers.StaticCache(config=hf.config, max_cache_len=static_len, batch_size=B))
    kw = {_cache_kwarg(hf): cache, "use_cache": True}
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hf(prompt, attention_mask=mask[:, :T], position_ids=pos[:, :T], cache_position=torch.arange(T), **kw)
    return hf(step, attention_mask=mask, position_ids=pos[:, T:], cache_position=torch.tensor([T]), **kw).logits


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
