"""The fast CPU paths (QWEN2_PURE_FAST=1, the default outside the test suite) and the compiled decode step.

Fast mode runs PyTorch's fused attention (what transformers runs by default, SDPA) and, on CPUs without
bf16 instructions, prompt-sized bf16 products as fp32 GEMMs. It is checked against transformers' SDPA path
and against our exact mode; the compiled decode step must give the eager step's tokens.
"""

import pytest
import torch

import qwen2_pure as q
from hf_utils import VOCAB, load_hf, make_hf_checkpoint
from qwen2_pure import ops
from qwen2_pure.fast import DecodeStep, enable_compile

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("QWEN2_PURE_FAST", "1")
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_hf_checkpoint(path, heads=14, kv_heads=2, head_dim=64, tied=False, intermediate=128)
    return path


def ids(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 2, (batch, length), generator=g)


def test_fp32_fast_matches_transformers_sdpa(ckpt):
    hf, ours = load_hf(ckpt, attn="sdpa"), q.load_model(ckpt)
    x = ids(2, 37)
    torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-4)


def test_bf16_fast_matches_transformers_bf16(ckpt):
    # bf16 rounding differs with op order: judge both engines by their distance to the fp32 logits
    x = ids(2, 40, seed=2)  # 80 rows: the bf16 products run as fp32 GEMMs on a CPU without bf16 instructions
    exact = q.load_model(ckpt)(x)
    hf = load_hf(ckpt, dtype=torch.bfloat16, attn="sdpa")(x).logits.float()
    ours = q.load_model(ckpt, dtype=torch.bfloat16)(x).float()
    assert (ours - exact).abs().max() <= 1.25 * (hf - exact).abs().max()
    assert (ours - hf).abs().max() < 0.2  # transformers' own eager and SDPA bf16 logits differ by ~0.3 here
    assert (ours.argmax(-1) == hf.argmax(-1)).float().mean() > 0.97


def test_upcast_linear_is_the_same_product():
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    w = torch.randn(80, 96, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), w.float()).to(torch.bfloat16)
    torch.testing.assert_close(ops.linear(x, w), ref, rtol=0, atol=0)


def test_fast_and_exact_generate_the_same_tokens(ckpt, monkeypatch):
    model = q.load_model(ckpt)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # left padding too
    fast = q.generate(model, prompts, max_new_tokens=10, stop_token_ids=[])
    monkeypatch.setenv("QWEN2_PURE_FAST", "0")
    assert q.generate(model, prompts, max_new_tokens=10, stop_token_ids=[]) == fast


def test_static_step_equals_dynamic_step(ckpt):
    model = q.load_model(ckpt)
    x = ids(2, 9, seed=3)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    mask[:, 10:] = 0  # slots not written yet
    cache_a, cache_b = model.new_cache(2, 16), model.new_cache(2, 16)
    for cache in (cache_a, cache_b):
        model(x, attention_mask=mask[:, :9], cache=cache, input_pos=torch.arange(9))
    step = torch.tensor([[4], [7]])
    mask[:, 9] = 1
    pos = torch.tensor([9])
    dyn = model(step, attention_mask=mask[:, :10], cache=cache_a, input_pos=pos)
    sta = model(step, attention_mask=mask, cache=cache_b, input_pos=pos, static=True)
    torch.testing.assert_close(sta, dyn, rtol=0, atol=1e-5)


def test_compiled_decode_step_gives_the_eager_tokens(ckpt, monkeypatch):
    model = q.load_model(ckpt)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    eager = q.generate(model, prompts, max_new_tokens=8, stop_token_ids=[])
    eager_long = q.generate(model, [[1, 2, 3] * 5, [4] * 9], max_new_tokens=5, stop_token_ids=[])
    enable_compile(model)
    assert isinstance(model.decode_step, DecodeStep)
    assert q.generate(model, prompts, max_new_tokens=8, stop_token_ids=[]) == eager
    # another prompt and cache length with the same batch size: same compiled code (the slot dim is dynamic)
    compiled = model.decode_step._compiled
    assert q.generate(model, [[1, 2, 3] * 5, [4] * 9], max_new_tokens=5, stop_token_ids=[]) == eager_long
    assert model.decode_step._compiled is compiled
    monkeypatch.setenv("QWEN2_PURE_COMPILE", "0")  # the switch: the eager static step, same tokens
    assert q.generate(model, prompts, max_new_tokens=8, stop_token_ids=[]) == eager


def test_load_model_compile_flag(ckpt):
    model = q.load_model(ckpt, compile=True)
    assert isinstance(model.decode_step, DecodeStep)
    assert getattr(q.load_model(ckpt), "decode_step", None) is None
