"""Weight-only int8 / int4: the quantizers' error bounds, the packed kernels against the dequantized weight,
quantizing while loading against quantizing a loaded model, and the user-facing errors."""

import pytest
import torch
import torch.nn.functional as F

import qwen2_pure as q
from hf_utils import assert_within_reference, make_hf_checkpoint
from qwen2_pure.quant import QuantLinear, quantization_of, quantize_int4, quantize_int8, quantize_model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_int8_error_is_at_most_half_a_step():
    g = seeded(0)
    w = torch.randn(48, 128, generator=g) * torch.rand(48, 1, generator=g) * 3
    qw, scale = quantize_int8(w)
    assert qw.dtype == torch.int8 and qw.abs().max() <= 127
    err = (qw.float() * scale[:, None] - w).abs()
    # half a step, plus the fp32 roundings of w / s and q * s (each at most an ulp of |w|)
    assert (err <= scale[:, None] / 2 + 2 * torch.finfo(torch.float32).eps * w.abs()).all()
    assert (qw.abs().amax(1) == 127).all()  # each row's largest weight uses the full range


def test_int4_levels_and_search_never_worse_than_min_max():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    w[0, 5] = 12.0  # an outlier: the range search should shrink the other groups' ranges, not this one's
    qw, s, m = quantize_int4(w, 32)
    assert qw.dtype == torch.uint8 and int(qw.max()) <= 15
    deq = (qw.view(32, 8, 32).float() * s[..., None] + m[..., None]).view(32, 256)
    wg = w.view(32, 8, 32)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1)
    plain_s = (hi - lo) / 15
    plain = (torch.round((wg - lo[..., None]) / plain_s[..., None]).clamp(0, 15) * plain_s[..., None] + lo[..., None])
    err_g = ((deq - w).view(32, 8, 32) ** 2).sum(-1)
    plain_g = ((plain - wg) ** 2).sum(-1)
    assert (err_g <= plain_g + 1e-6).all()
    rel = ((deq - w).pow(2).mean() / w.pow(2).mean()).sqrt()
    assert rel < 0.1  # 4 bits: ~8% relative RMS error on Gaussian weights


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 40])  # the packed kernel (few rows) and the dense GEMM path (many)
def test_quant_linear_equals_its_dequantized_weight(mode, rows):
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 96, bias=True).to(torch.bfloat16)
    ql = QuantLinear.from_linear(lin, mode)
    x = torch.randn(2, rows, 128, dtype=torch.bfloat16)
    out = ql(x)
    assert out.shape == (2, rows, 96) and out.dtype == torch.bfloat16
    ref = F.linear(x.float(), ql.dequantize(torch.float32), lin.bias.float())
    # the exact product rounded to the bf16 output the layer returns: the error a perfect kernel still makes
    rounded = F.linear(x.float(), ql.dequantize(torch.float32)).to(torch.bfloat16) + lin.bias
    assert_within_reference(out, ref, rounded, ref, what=f"{mode} kernel, {rows} rows, vs the fp32 product")
    # and the quantized weight is close to the original one
    rel = (ql.dequantize() - lin.weight.float()).norm() / lin.weight.float().norm()
    assert rel < (0.01 if mode == "int8" else 0.1)


def test_quant_linear_float32_activations():
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 32, bias=False)
    ql = QuantLinear.from_linear(lin, "int4")
    x = torch.randn(1, 64, generator=seeded(3))
    out = ql(x)
    assert out.dtype == torch.float32
    # the kernel takes bf16 activations and returns bf16: the exact product of the rounded input, rounded
    ref = F.linear(x, ql.dequantize())
    rounded = F.linear(x.to(torch.bfloat16).float(), ql.dequantize()).to(torch.bfloat16)
    assert_within_reference(out, ref, rounded, ref, what="int4 kernel, fp32 activations, vs the fp32 product")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_hf_checkpoint(path, heads=4, kv_heads=2, head_dim=64, tied=True, intermediate=128)
    return path


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_while_loading_equals_quantizing_after(ckpt, mode):
    x = torch.randint(0, 250, (2, 21), generator=seeded(0))
    result = q.load(ckpt, dtype="float32", quantize=mode, tokenizer=False)
    loaded = result.model
    after = quantize_model(q.load_model(ckpt, dtype="float32"), mode)
    # read off the layers; nothing is attached to the model
    assert result.quantization == quantization_of(loaded) == quantization_of(after) == mode
    assert not hasattr(loaded, "quantization") and quantization_of(q.load_model(ckpt)) is None
    torch.testing.assert_close(loaded(x), after(x), rtol=0, atol=0)
    layer = loaded.model.layers[0]
    for name in ("q_proj", "k_proj", "o_proj"):
        lin = getattr(layer.self_attn, name)
        assert isinstance(lin, QuantLinear) and lin.mode == mode
    assert layer.self_attn.q_proj.bias is not None and layer.self_attn.q_proj.bias.dtype == torch.float32
    assert isinstance(layer.mlp.down_proj, QuantLinear) and layer.mlp.gate_proj.mode == mode
    if mode == "int4":  # llama.cpp's Q4_K_M rule: v_proj and down_proj of the more-bits layers stay int8
        assert loaded.model.layers[1].self_attn.v_proj.mode == loaded.model.layers[1].mlp.down_proj.mode == "int8"
        assert loaded.model.layers[0].mlp.down_proj.mode == "int4"
    # the tied head has its own quantized copy (int8 in both modes); the embedding stays a float table
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.mode == "int8"
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    float_model = q.load_model(ckpt, dtype="float32")
    close = (loaded(x).argmax(-1) == float_model(x).argmax(-1)).float().mean()
    assert close > (0.9 if mode == "int8" else 0.5)


def test_quantized_generation_runs_and_bf16(ckpt):
    model = q.load_model(ckpt, dtype="bfloat16", quantize="int8")
    [out] = q.generate(model, [[3, 4, 5, 6]], max_new_tokens=6, stop_token_ids=[])
    ref = q.load_model(ckpt, dtype="bfloat16")
    [want] = q.generate(ref, [[3, 4, 5, 6]], max_new_tokens=6, stop_token_ids=[])
    assert len(out) == 6 and all(isinstance(t, int) for t in out)
    assert out[:2] == want[:2]


def test_quantize_errors(ckpt, tmp_path):
    with pytest.raises(q.Qwen2PureError, match="quantize='int3'"):
        q.load_model(ckpt, quantize="int3")
    with pytest.raises(q.Qwen2PureError, match="adapter= and quantize="):
        q.load_model(ckpt, quantize="int8", adapter=tmp_path)
    with pytest.raises(q.Qwen2PureError, match="multiple of group_size"):
        QuantLinear(48, 16, False, "int4")
    with pytest.raises(q.Qwen2PureError, match="multiple of 16"):
        QuantLinear(64, 24, False, "int4")


def test_gguf_4bit_blocks_are_taken_as_they_are(tiny_gguf, monkeypatch):
    """Q4_0 (blk.0.attn_output) and Q4_K (blk.1.ffn_down) blocks become int4 layers without a round trip
    through floats; the dequantized weight is ggml's own, up to the bf16 rounding of the kernel's scales."""
    from qwen2_pure.loading import _StrictAssigner
    taken = []
    original = _StrictAssigner.assign_int4

    def spy(self, name, values, where):
        taken.append(name)
        return original(self, name, values, where)

    monkeypatch.setattr(_StrictAssigner, "assign_int4", spy)
    # with 2 layers llama.cpp's more-bits rule would keep block 1's down_proj at int8: turned off here
    monkeypatch.setattr("qwen2_pure.quant.more_bits", lambda layer, n: False)
    quant = q.load_model(tiny_gguf, quantize="int4")
    ref = q.load_model(tiny_gguf)  # fp32, dequantized by gguf
    # o_proj of block 0 (Q4_0) and down_proj of block 1 (Q4_K)
    assert taken == ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    for lin, want in [(quant.model.layers[0].self_attn.o_proj, ref.model.layers[0].self_attn.o_proj.weight),
                      (quant.model.layers[1].mlp.down_proj, ref.model.layers[1].mlp.down_proj.weight)]:
        assert lin.mode == "int4"
        # bf16 scales and zero points (the kernel's format): ~2^-9 of |zero| + 8 |scale| per value
        torch.testing.assert_close(lin.dequantize(), want, rtol=1e-2, atol=4e-3 * float(want.abs().max()))
    x = torch.randint(0, 200, (1, 12), generator=seeded(0))
    a, b = quant(x).flatten(), ref(x).flatten()  # random tiny weights: argmax is fragile, the logits are not
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_decode_int4_blocks_matches_gguf():
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from qwen2_pure.loading.gguf import decode_int4_blocks
    rng = np.random.default_rng(0)
    for kind, size in [("Q4_0", 18), ("Q4_1", 20), ("Q4_K", 144)]:
        raw = rng.integers(0, 256, (6, size), dtype=np.uint8)
        raw[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite scales
        raw[:, 2:4] = np.frombuffer(np.float16(-0.02 if kind == "Q4_1" else 0.005).tobytes(), np.uint8)
        ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(-1)
        qv, s, m = decode_int4_blocks(raw, kind)
        np.testing.assert_allclose((qv * s[:, None] + m[:, None]).reshape(-1), ref, rtol=1e-6, atol=1e-7)
