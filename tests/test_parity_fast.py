"""Parity in fast mode (the library's default, `qwen2_pure.Settings(fast=True)`) against transformers' SDPA path.

tests/test_model.py and tests/test_moe.py compare exact mode (`fast=False`, set for the suite by conftest.py
through QWEN2_PURE_FAST=0) with transformers' eager attention. This file runs the same scenarios with our model
loaded with `settings=Settings(fast=True)` (PyTorch SDPA attention) against transformers loaded with
`attn_implementation="sdpa"`: fp32 logits for several head layouts (group sizes 7, 6 and 1, tied and untied),
a left-padded batch and its rows alone, cached decode vs the full forward, greedy tokens vs
transformers.generate, seeded sampling vs transformers, sliding-window layers, YaRN RoPE scaling and the MoE
model.

CPU features: everything here is fp32, so fast mode's other path (prompt-sized bf16 products run as fp32 GEMMs)
is never taken; it is taken only for bf16/fp16 on a CPU without AVX-512-BF16 and AMX
(`qwen2_pure.ops.native_bf16()` false) and is tested in tests/test_fast.py, on both kinds of CPU. What does vary
by CPU is how the fp32 GEMM/SDPA kernels (AVX2, AVX-512, oneDNN) block their sums for the shapes at hand, so no
tolerance here is a number: `assert_within_reference` bounds our distance to transformers' SDPA by transformers'
own distance between its SDPA and eager paths (or between the two computations of the pair: padded vs alone,
cached vs full) measured on this machine, with the helper's floor of a few fp32 ulps. Tokens must be equal; for
greedy decoding a near-tie is ruled out by checking that transformers' top-1/top-2 logit margin at every
generated position exceeds twice that bound. Every random input is seeded.
"""

import pytest
import torch

import qwen2_pure as q
from hf_utils import (VOCAB, assert_within_reference, hf_cached_logits, load_hf, make_hf_checkpoint,
                      make_hf_moe_checkpoint, max_diff)

transformers = pytest.importorskip("transformers")

FAST = q.Settings(fast=True)

# (query heads, KV heads, head_dim, tied): group sizes 7, 6 and 1; tied and untied. Small head_dim: fast to run.
SHAPES = [(14, 2, 32, False), (12, 2, 32, True), (4, 4, 32, False)]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


class Models:
    """One checkpoint, loaded once: ours in fast mode, transformers with SDPA and with eager attention."""

    def __init__(self, path):
        self.path = path
        self.ours = q.load_model(path, settings=FAST)
        assert self.ours.settings.fast
        self.sdpa = load_hf(path, attn="sdpa")
        self.eager = load_hf(path)


@pytest.fixture(scope="module", params=SHAPES,
                ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}-{'tied' if s[3] else 'untied'}")
def models(request, tmp_path_factory):
    heads, kv, d, tied = request.param
    path = tmp_path_factory.mktemp("ckpt")
    make_hf_checkpoint(path, heads=heads, kv_heads=kv, head_dim=d, tied=tied)
    with torch.no_grad():
        yield Models(path)


def ids(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 2, (batch, length), generator=g)


def assert_no_greedy_tie(m, prompt, generated, factor=4.0, floor_ulps=4):
    """Equal greedy tokens are a fair demand only where no position is a near-tie: transformers' SDPA top-1/top-2
    margin at every generated position must exceed twice the bound our logits are held to (its SDPA-vs-eager and
    cached-vs-full distances, times `factor`, or the floor), so a difference within the bound cannot flip it."""
    seq = torch.cat([prompt, torch.tensor([generated])], dim=1)
    P = prompt.shape[1]
    full = m.sdpa(seq).logits
    dist = max(max_diff(full, m.eager(seq).logits), max_diff(full, hf_cached_logits(m.sdpa, seq, P)))
    floor = floor_ulps * torch.finfo(torch.float32).eps * full.abs().max().item()
    bound = max(factor * dist, floor)
    top2 = full[0, P - 1:-1].topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > 2 * bound, f"a near-tie: smallest top-2 margin {margin:.3g} <= 2 x bound {bound:.3g}"


def test_settings_are_fast(models):
    # the suite's default is exact mode (QWEN2_PURE_FAST=0); the explicit settings must win
    assert models.ours.settings.fast and all(mod.settings.fast for mod in models.ours.modules()
                                               if hasattr(mod, "settings"))
    assert models.sdpa.config._attn_implementation == "sdpa"


def test_fp32_logits_match_sdpa(models):
    m = models
    x = ids(2, 37)
    ref = m.sdpa(x).logits
    assert ref.abs().max() > 3  # logits that vary, not a degenerate model
    assert_within_reference(m.ours(x), ref, m.eager(x).logits, ref, what="fast fp32 vs transformers SDPA")


def test_left_padded_batch(models):
    m = models
    long, short = ids(1, 20, seed=3)[0], ids(1, 12, seed=4)[0]
    batch = torch.stack([long, torch.cat([torch.full((8,), VOCAB - 2), short])])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = m.ours(batch, attention_mask=mask)
    ref = m.sdpa(batch, attention_mask=mask, position_ids=pos).logits
    eager = m.eager(batch, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # padded positions attend to nothing real: only real tokens' logits count
    assert_within_reference(got[real], ref[real], eager[real], ref[real], what="padded batch vs transformers SDPA")
    for row, alone in ((0, long), (1, short)):
        assert_within_reference(got[row, -len(alone):], m.ours(alone[None])[0], ref[row, -len(alone):],
                                m.sdpa(alone[None]).logits[0], what=f"row {row}: padded batch vs alone")


def test_cached_decode_equals_full_forward(models):
    m = models
    x = ids(2, 24, seed=5)
    full = m.ours(x)
    cache = m.ours.new_cache(2, 32)
    prefill = m.ours(x[:, :16], cache=cache, input_pos=torch.arange(16))
    steps = [m.ours(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(16, 24)]
    cached = torch.cat([prefill] + steps, dim=1)
    hf_cached, hf_full = hf_cached_logits(m.sdpa, x, 16), m.sdpa(x).logits
    assert_within_reference(cached, full, hf_cached, hf_full, what="cached decode vs full forward")
    # and the cached logits against transformers' cached SDPA ones, bounded by its SDPA-vs-eager distance
    assert_within_reference(cached, hf_cached, hf_cached_logits(m.eager, x, 16), hf_cached,
                            what="cached decode vs transformers SDPA cached decode")


def test_greedy_tokens_match_transformers_generate(models):
    m = models
    prompt = ids(1, 11, seed=6)
    ref = m.sdpa.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=VOCAB - 2)[0, 11:].tolist()
    got = q.generate(m.ours, [prompt[0].tolist()], max_new_tokens=24, stop_token_ids=[])[0]
    assert len(set(ref)) > 3  # a sequence that is not one repeated token
    assert_no_greedy_tie(m, prompt, ref)
    assert got == ref


def test_seeded_sampling_matches_transformers(models):
    """Same processors, same order, same RNG draws: transformers' SDPA sampled tokens, token for token. (A logit
    difference within the bound moves a probability by ~1e-6 relative: a draw flips only if it lands that close to a
    bucket edge, or a top-p/min-p cut-off sits that close; not the case for these seeds.)"""
    m = models
    prompt = ids(1, 9, seed=9)
    opts = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1)
    torch.manual_seed(1234)
    ref = m.sdpa.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=True,
                          min_p=0.02, eos_token_id=None, pad_token_id=VOCAB - 2, **opts)[0, 9:].tolist()
    got = q.generate(m.ours, [prompt[0].tolist()], max_new_tokens=16, min_p=0.02, seed=1234, stop_token_ids=[],
                     **opts)[0]
    assert got == ref


def test_sliding_window_matches_transformers_sdpa(tmp_path):
    # 4 layers, the last 2 sliding with a window of 5
    make_hf_checkpoint(tmp_path, heads=14, kv_heads=2, head_dim=32, layers=4, use_sliding_window=True,
                       sliding_window=5, max_window_layers=2)
    m = Models(tmp_path)
    assert [layer.window for layer in m.ours.model.layers] == [None, None, 5, 5]
    x = ids(1, 21, seed=11)
    ref = m.sdpa(x).logits
    got = m.ours(x)
    assert_within_reference(got, ref, m.eager(x).logits, ref, what="sliding window vs transformers SDPA")
    cache = m.ours.new_cache(1, 21)
    pre = m.ours(x[:, :10], cache=cache, input_pos=torch.arange(10))
    rest = [m.ours(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(10, 21)]
    assert_within_reference(torch.cat([pre] + rest, 1), got, hf_cached_logits(m.sdpa, x, 10), ref,
                            what="sliding window: cached decode vs full forward")


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 48, "beta_fast": 16, "beta_slow": 2},
], ids=["yarn-4", "yarn-2-betas"])
def test_yarn_rope_matches_transformers_sdpa(tmp_path, scaling):
    make_hf_checkpoint(tmp_path, heads=14, kv_heads=2, head_dim=32, max_pos=256,
                       rope_parameters={"rope_theta": 1e6, **scaling})
    m = Models(tmp_path)
    assert m.ours.config.rope_scaling["rope_type"] == "yarn"
    x = ids(1, 150, seed=12)  # past the "original" context, where the scaling matters
    ref = m.sdpa(x).logits
    assert_within_reference(m.ours(x), ref, m.eager(x).logits, ref, what="YaRN RoPE vs transformers SDPA")


# ---- MoE ------------------------------------------------------------------------------------------------------

def load_hf_moe(path, attn, experts="eager"):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn, experts_implementation=experts).eval()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    make_hf_moe_checkpoint(path)  # 14 query heads over 2 KV heads, every layer MoE, norm_topk_prob=False
    m = Models.__new__(Models)
    m.path, m.ours = path, q.load_model(path, settings=FAST)
    m.sdpa, m.eager = load_hf_moe(path, "sdpa"), load_hf_moe(path, "eager")
    m.grouped = load_hf_moe(path, "sdpa", experts="grouped_mm")
    return m


def test_moe_fp32_logits_match_sdpa(moe):
    # bounded by the farther of transformers' own other implementations of the same model: its eager attention,
    # and its grouped_mm experts kernel (which sums the k experts in another order)
    x = ids(2, 37)
    ref = moe.sdpa(x).logits
    assert ref.abs().max() > 3
    other = max((moe.eager(x).logits, moe.grouped(x).logits), key=lambda o: max_diff(o, ref))
    assert_within_reference(moe.ours(x), ref, other, ref, what="MoE fast fp32 vs transformers SDPA")


def test_moe_cached_decode_equals_full_forward(moe):
    x = ids(2, 24, seed=5)
    full = moe.ours(x)
    cache = moe.ours.new_cache(2, 32)
    prefill = moe.ours(x[:, :16], cache=cache, input_pos=torch.arange(16))
    steps = [moe.ours(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(16, 24)]
    assert_within_reference(torch.cat([prefill] + steps, dim=1), full, hf_cached_logits(moe.sdpa, x, 16),
                            moe.sdpa(x).logits, what="MoE cached decode vs full forward")


def test_moe_greedy_tokens_match_transformers_generate(moe):
    prompt = ids(1, 11, seed=6)
    ref = moe.sdpa.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                            eos_token_id=None, pad_token_id=VOCAB - 2)[0, 11:].tolist()
    got = q.generate(moe.ours, [prompt[0].tolist()], max_new_tokens=16, stop_token_ids=[])[0]
    assert len(set(ref)) > 3
    assert_no_greedy_tie(moe, prompt, ref)
    assert got == ref
