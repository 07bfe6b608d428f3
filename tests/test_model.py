"""Parity with transformers: tiny random checkpoints saved by transformers, read by our production loader.

Two kinds of comparison. Against transformers' eager attention, same op order: bit for bit, in fp32 and bf16,
wherever the machine's GEMMs round our grouped-head shapes as transformers' per-head ones (checked for the shapes
at hand; true with AVX-512 and AMX kernels, not always with MKL's AVX2 ones: `hf_utils.assert_same_op_order`).
Everything else (SDPA, padded vs unpadded, cached vs full forward) rounds by the CPU's kernels for the shapes at
hand, so it is bounded by transformers' own distance for the same pair, measured here
(`hf_utils.assert_within_reference`), never by a number from another machine.
"""

import pytest
import torch

import qwen2_pure as q
from hf_utils import (VOCAB, assert_same_op_order, assert_within_reference, hf_cached_logits, load_hf,
                      make_hf_checkpoint)

transformers = pytest.importorskip("transformers")

# (query heads, KV heads, head_dim, tied): group sizes 7, 6 and 1; head_dim 64 and 128; tied and untied
SHAPES = [(14, 2, 64, False), (12, 2, 128, True), (4, 4, 64, False), (6, 1, 64, True)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}-{'tied' if s[3] else 'untied'}")
def ckpt(request, tmp_path_factory):
    heads, kv, d, tied = request.param
    path = tmp_path_factory.mktemp("ckpt")
    make_hf_checkpoint(path, heads=heads, kv_heads=kv, head_dim=d, tied=tied)
    return path


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def ids(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 2, (batch, length), generator=g)


def test_fp32_logits_match_eager(ckpt):
    hf, ours = load_hf(ckpt), q.load_model(ckpt)
    x = ids(2, 37)
    ref = hf(x).logits
    assert ref.abs().max() > 3  # logits that vary, not a degenerate model
    assert_same_op_order(ours(x), ref, lambda: load_hf(ckpt, attn="sdpa")(x).logits, model=ours, ids=x,
                         what="fp32 logits")


def test_fp32_logits_match_sdpa(ckpt):
    # no further from transformers' SDPA than its own eager attention is
    hf, eager, ours = load_hf(ckpt, attn="sdpa"), load_hf(ckpt), q.load_model(ckpt)
    x = ids(1, 19, seed=1)
    ref = hf(x).logits
    assert_within_reference(ours(x), ref, eager(x).logits, ref, what="ours vs transformers SDPA")


def test_bf16_logits_match_transformers_bf16(ckpt):
    # the reference is loaded with dtype=bf16 (keeps inv_freq in fp32), never built with .to(bf16)
    hf, ours = load_hf(ckpt, dtype=torch.bfloat16), q.load_model(ckpt, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    x = ids(2, 29, seed=2)
    assert_same_op_order(ours(x), hf(x).logits, lambda: load_hf(ckpt, torch.bfloat16, attn="sdpa")(x).logits,
                         model=ours, ids=x, what="bf16 logits")


def test_left_padded_batch(ckpt):
    hf, ours = load_hf(ckpt), q.load_model(ckpt)
    long, short = ids(1, 20, seed=3)[0], ids(1, 12, seed=4)[0]
    batch = torch.stack([long, torch.cat([torch.full((8,), VOCAB - 2), short])])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    got = ours(batch, attention_mask=mask)  # positions derived from the mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(batch, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # padded positions attend to nothing real: only real tokens' logits count
    assert_same_op_order(got[real], ref[real], lambda: load_hf(ckpt, attn="sdpa")(
        batch, attention_mask=mask, position_ids=pos).logits[real], model=ours, ids=batch, what="padded batch")
    # and each row equals its unpadded forward, as closely as transformers' rows equal theirs: the padded
    # batch runs other GEMM shapes (transformers' own rows: 0 to 8e-5 apart on one Xeon, by head_dim and ISA)
    for row, alone in ((0, long), (1, short)):
        assert_within_reference(got[row, -len(alone):], ours(alone[None])[0], ref[row, -len(alone):],
                                hf(alone[None]).logits[0], what=f"row {row}: padded batch vs alone")


def test_cached_decode_equals_full_forward(ckpt):
    hf, ours = load_hf(ckpt), q.load_model(ckpt)
    x = ids(2, 24, seed=5)
    full = ours(x)
    cache = ours.new_cache(2, 32)
    prefill = ours(x[:, :16], cache=cache, input_pos=torch.arange(16))
    steps = [ours(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(16, 24)]
    # Different matmul shapes round differently: bounded by transformers' own cached-vs-full distance here.
    # A wrong slot, position or mask moves logits by whole units.
    assert_within_reference(torch.cat([prefill] + steps, dim=1), full, hf_cached_logits(hf, x, 16), hf(x).logits,
                            what="cached decode vs full forward")


def test_greedy_tokens_match_transformers_generate(ckpt):
    hf, ours = load_hf(ckpt), q.load_model(ckpt)
    prompt = ids(1, 11, seed=6)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=VOCAB - 2)[0, 11:].tolist()
    got = q.generate(ours, [prompt[0].tolist()], max_new_tokens=32, stop_token_ids=[])[0]
    assert len(set(ref)) > 3  # a sequence that is not one repeated token
    assert got == ref


def test_batched_generate_equals_single(ckpt):
    ours = q.load_model(ckpt)
    a, b = ids(1, 15, seed=7)[0].tolist(), ids(1, 6, seed=8)[0].tolist()
    both = q.generate(ours, [a, b], max_new_tokens=16, stop_token_ids=[])
    assert both == [q.generate(ours, [a], max_new_tokens=16, stop_token_ids=[])[0],
                    q.generate(ours, [b], max_new_tokens=16, stop_token_ids=[])[0]]


def test_seeded_sampling_matches_transformers(ckpt):
    """Same processors, same order, same RNG draws: transformers' sampled tokens, token for token."""
    hf, ours = load_hf(ckpt), q.load_model(ckpt)
    prompt = ids(1, 9, seed=9)
    opts = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1)
    torch.manual_seed(1234)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=True,
                      min_p=0.02, eos_token_id=None, pad_token_id=VOCAB - 2, **opts)[0, 9:].tolist()
    got = q.generate(ours, [prompt[0].tolist()], max_new_tokens=24, min_p=0.02, seed=1234, stop_token_ids=[],
                     **opts)[0]
    assert got == ref
    assert q.generate(ours, [prompt[0].tolist()], max_new_tokens=24, min_p=0.02, seed=1234, stop_token_ids=[],
                      **opts)[0] == got


def test_stop_token_included_and_row_stops(ckpt):
    ours = q.load_model(ckpt)
    p = ids(1, 8, seed=10)[0].tolist()
    free = q.generate(ours, [p], max_new_tokens=12, stop_token_ids=[])[0]
    stop = free[5]
    first = free.index(stop)
    got = q.generate(ours, [p, p], max_new_tokens=12, stop_token_ids=[stop])
    assert got == [free[:first + 1]] * 2


def test_sliding_window_matches_transformers(tmp_path):
    # 4 layers, the last 2 sliding with a window of 5 (transformers 4.57+ semantics)
    make_hf_checkpoint(tmp_path, layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=2)
    ours = q.load_model(tmp_path)
    assert [layer.window for layer in ours.model.layers] == [None, None, 5, 5]
    hf = load_hf(tmp_path)
    x = ids(1, 21, seed=11)
    assert_same_op_order(ours(x), hf(x).logits, lambda: load_hf(tmp_path, attn="sdpa")(x).logits,
                         model=ours, ids=x, what="sliding window")
    # the window matters: without it the logits differ
    full = q.load_model(tmp_path)
    for layer in full.model.layers:
        layer.window = None
    assert (full(x) - ours(x)).abs().max() > 1e-3
    # and the cache honours it
    cache = ours.new_cache(1, 21)
    pre = ours(x[:, :10], cache=cache, input_pos=torch.arange(10))
    rest = [ours(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(10, 21)]
    assert_within_reference(torch.cat([pre] + rest, 1), ours(x), hf_cached_logits(hf, x, 10), hf(x).logits,
                            what="sliding window: cached decode vs full forward")


def test_rope_tables_stay_fp32_after_to_bf16(ckpt):
    ours = q.load_model(ckpt).to(torch.bfloat16)
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # Qwen2's model-card recipe, scaled
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 48, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "linear", "factor": 2.0},
], ids=["yarn-4", "yarn-2-betas", "linear-2"])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    make_hf_checkpoint(tmp_path, max_pos=256, rope_parameters={"rope_theta": 1e6, **scaling})
    ours, hf = q.load_model(tmp_path), load_hf(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == scaling["rope_type"]
    x = ids(1, 150, seed=12)  # past the "original" context, where the scaling matters
    assert_same_op_order(ours(x), hf(x).logits, lambda: load_hf(tmp_path, attn="sdpa")(x).logits,
                         model=ours, ids=x, what=f"{scaling['rope_type']} RoPE")
    # the scaling really changes the model (positions past the original context differ)
    plain = make_hf_checkpoint(tmp_path / "plain", max_pos=256)
    assert (q.load_model(tmp_path / "plain")(x) - ours(x)).abs().max() > 1e-2
