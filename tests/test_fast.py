"""The fast CPU paths (QWEN2_PURE_FAST=1, the default outside the test suite) and the compiled decode step.

Fast mode runs PyTorch's fused attention (what transformers runs by default, SDPA) and, on CPUs without
bf16 instructions, prompt-sized bf16 products as fp32 GEMMs. It is checked against transformers' SDPA path
and against our exact mode; the compiled decode step must give the eager step's tokens.

Which CPU features each test covers is said in it. The bf16 upcast is taken only on a CPU without AVX-512-BF16
and AMX (`ops.native_bf16()` false); on one with them the tests force it (`force_upcast`), so both classes of CPU
check both paths. Tolerances are transformers' own distances for the same pair, measured on the machine that
runs the test (`hf_utils.assert_within_reference`); inputs are seeded.
"""

import pytest
import torch

import qwen2_pure as q
from hf_utils import VOCAB, assert_within_reference, hf_step_logits, load_hf, make_hf_checkpoint
from qwen2_pure import ops
from qwen2_pure.fast import decode_step_for

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


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def force_upcast(monkeypatch):
    """Take the fp32-GEMM path for bf16 prompts as a CPU without AVX-512-BF16 / AMX does, on any CPU."""
    monkeypatch.setattr(ops, "native_bf16", lambda: False)


def test_fp32_fast_matches_transformers_sdpa(ckpt):
    # any CPU (fp32 SDPA): no further from transformers' SDPA than its own eager attention is
    hf, eager, ours = load_hf(ckpt, attn="sdpa"), load_hf(ckpt), q.load_model(ckpt)
    x = ids(2, 37)
    ref = hf(x).logits
    assert_within_reference(ours(x), ref, eager(x).logits, ref, what="fast fp32 vs transformers SDPA")


@pytest.mark.parametrize("path", ["this-cpu", "upcast"])
def test_bf16_fast_matches_transformers_bf16(ckpt, path, monkeypatch):
    """this-cpu: the bf16 path this CPU takes (native bf16 GEMMs with AVX-512-BF16 / AMX, else the upcast);
    upcast: the fp32 GEMMs of a CPU without them, forced where this CPU has them."""
    if path == "upcast":
        if not ops.native_bf16():
            pytest.skip("no AVX-512-BF16 / AMX here: 'this-cpu' already runs the upcast")
        force_upcast(monkeypatch)
    # bf16 rounding differs with op order: judge both engines by their distance to the fp32 logits
    x = ids(2, 40, seed=2)  # 80 rows: enough for the upcast (ops.UPCAST_FROM_ROWS)
    exact = q.load_model(ckpt)(x)
    hf = load_hf(ckpt, dtype=torch.bfloat16, attn="sdpa")(x).logits.float()
    hf_eager = load_hf(ckpt, dtype=torch.bfloat16)(x).logits.float()
    ours = q.load_model(ckpt, dtype=torch.bfloat16)(x).float()
    assert_within_reference(ours, exact, hf, exact, factor=1.25, what="bf16 vs fp32 logits")
    # and no further from transformers' SDPA than its own eager attention is, in logits and in top-1 picks
    assert_within_reference(ours, hf, hf_eager, hf, factor=1, what="bf16 vs transformers SDPA bf16")
    flips, hf_flips = ((a.argmax(-1) != hf.argmax(-1)).sum().item() for a in (ours, hf_eager))
    assert flips <= max(hf_flips, 1), (
        f"top-1 differs from transformers SDPA at {flips} positions (its eager: {hf_flips})")


def test_upcast_linear_is_the_same_product(monkeypatch):
    # the upcast path (forced on a CPU with AVX-512-BF16 / AMX): exactly the fp32 GEMM, rounded once to bf16
    force_upcast(monkeypatch)
    x, w = bf16(64, 96, seed=0), bf16(80, 96, seed=1)
    ref = torch.nn.functional.linear(x.float(), w.float()).to(torch.bfloat16)
    torch.testing.assert_close(ops.linear(x, w), ref, rtol=0, atol=0)


def test_linear_takes_the_path_this_cpu_promises():
    """Without AVX-512-BF16 / AMX a prompt-sized bf16 product is the fp32 GEMM rounded once (bit for bit);
    with them it is PyTorch's native bf16 product (bit for bit), whose rounding differs from the fp32 one in
    a few elements, which is why the upcast is not taken there. Decode-sized products stay bf16 everywhere."""
    x, w = bf16(64, 96, seed=2), bf16(80, 96, seed=3)
    native = torch.nn.functional.linear(x, w)
    upcast = torch.nn.functional.linear(x.float(), w.float()).to(torch.bfloat16)
    torch.testing.assert_close(ops.linear(x, w), native if ops.native_bf16() else upcast, rtol=0, atol=0)
    small = x[:ops.UPCAST_FROM_ROWS - 1]
    torch.testing.assert_close(ops.linear(small, w), torch.nn.functional.linear(small, w), rtol=0, atol=0)


def test_fast_and_exact_generate_the_same_tokens(ckpt):
    # any CPU (fp32): SDPA and eager attention pick the same greedy tokens on this prompt
    model = q.load_model(ckpt)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # left padding too
    fast = q.generate(model, prompts, max_new_tokens=10, stop_token_ids=[])
    exact = q.load_model(ckpt, settings=q.Settings(fast=False))
    assert q.generate(exact, prompts, max_new_tokens=10, stop_token_ids=[]) == fast


def test_static_step_equals_dynamic_step(ckpt):
    # any CPU (fp32 SDPA): the step over all 16 slots, the unwritten ones masked, against the step over the 10
    # written ones; other shapes, other rounding, bounded by transformers' StaticCache-vs-DynamicCache distance
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
    sta = model(step, attention_mask=mask, cache=cache_b, input_pos=pos, kv_len=16)
    hf = load_hf(ckpt, attn="sdpa")
    hf_dyn = hf_step_logits(hf, x, mask[:, :10], step)
    hf_sta = hf_step_logits(hf, x, mask[:, :10], step, static_len=16)
    assert_within_reference(sta, dyn, hf_sta, hf_dyn, what="static vs dynamic decode step")


def test_compiled_decode_step_gives_the_eager_tokens(ckpt):
    # any CPU (fp32; inductor's C++ loops for this CPU's vector ISA): the compiled step's greedy tokens
    eager_model = q.load_model(ckpt)
    model = q.load_model(ckpt, compile=True)
    step = decode_step_for(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    longer = [[1, 2, 3] * 5, [4] * 9]
    eager = q.generate(eager_model, prompts, max_new_tokens=8, stop_token_ids=[])
    eager_long = q.generate(eager_model, longer, max_new_tokens=5, stop_token_ids=[])
    assert q.generate(model, prompts, max_new_tokens=8, stop_token_ids=[]) == eager
    assert step.calls == 7  # every decode step ran compiled (the first token comes from the prefill)
    # another prompt and cache length with the same batch size: the same compiled code (the slot dim is dynamic)
    compiled = step._compiled
    assert q.generate(model, longer, max_new_tokens=5, stop_token_ids=[]) == eager_long
    assert step._compiled is compiled and step.calls == 11
    assert decode_step_for(eager_model).calls == 0  # the eager model never took it


def test_compile_setting(ckpt, monkeypatch):
    """compile= and Settings(compile=) choose the step at load; QWEN2_PURE_COMPILE is only the default."""
    assert q.load_model(ckpt, compile=True).settings.compile
    assert not q.load_model(ckpt).settings.compile
    monkeypatch.setenv("QWEN2_PURE_COMPILE", "1")
    assert q.load_model(ckpt).settings.compile
    assert not q.load_model(ckpt, compile=False).settings.compile
    assert not q.load_model(ckpt, settings=q.Settings(compile=False)).settings.compile
    monkeypatch.setenv("QWEN2_PURE_COMPILE", "yes")
    with pytest.raises(q.Qwen2PureError, match="QWEN2_PURE_COMPILE='yes'"):
        q.load_model(ckpt)
