"""The Triton kernels against the one PyTorch reference, `qwen2_pure.ops` with `Settings(kernels="torch")`, and
the kernel switch: kernels asked for but not importable fail or warn, never fall back silently.

On a CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything
imports triton); on a GPU (benchmarks/gpu_check.sh) the same tests run the compiled kernels. The interpreter is
slow, so the grid is a chosen set of cases that covers every value of each axis — group sizes 1, 2, 7, 8; T and
S in {1, 17, 64, 129}; head_dim 64 and 128; fp32, fp16 and bf16 — not their full product. Every buffer the
kernels allocate is NaN-poisoned, so an element they fail to write fails the test. The attention references
run on the inputs upcast to fp32 (the kernels accumulate in fp32) and round the result to the input dtype.
The switch tests need no triton.

No tolerance is written down: each kernel is judged by its distance to the exact result (the same function in
float64, `exact_*`), which must be at most 4 times the PyTorch reference's own distance to it in the same dtype,
on the machine that runs the test (`hf_utils.assert_within_reference`). That allows for the interpreter's bf16,
which runs by upcast and truncates its fp32 -> bf16 casts (one ulp where the reference rounds to half of one),
and for the GPU's exp2 and reduction order.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from qwen2_pure import ops
from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.settings import Settings
from hf_utils import assert_within_reference

try:
    import qwen2_pure.kernels as K
except ImportError as e:  # no triton: only the switch tests run
    K, _WHY = None, f"triton is not importable ({e})"
else:
    _WHY = "no GPU and TRITON_INTERPRET is not set"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(K is None or (DEVICE == "cpu" and not K.INTERPRET), reason=_WHY)
TORCH = Settings(fast=False, kernels="torch")  # the references, in transformers' op order
TRITON = Settings(fast=False, kernels="triton")

@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every torch.empty / empty_like made during a test comes back filled with NaN (ints with -1)."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
    with torch.no_grad():
        yield


def rand(*shape, dtype, seed, layout_bthd=False):
    g = torch.Generator().manual_seed(seed)
    if layout_bthd:  # (B, T, H, D) transposed to (B, H, T, D): the model's non-contiguous q/k/v
        b, h, t, d = shape
        return torch.randn(b, t, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def close(out, ref, exact, what):
    """The kernel's `out` no further from the float64 `exact` result than 4x the PyTorch reference `ref` is."""
    assert not out.isnan().any(), f"{what}: NaN in the output (an element was never written)"
    assert_within_reference(out.double(), exact, ref.double(), exact, what=f"{what}, distance to the exact result")


def exact_attention(q, k, v, visible):
    """Attention in float64, softmax included, K/V heads repeated per group; rows that see nothing give 0."""
    n = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(n, 1), v.double().repeat_interleave(n, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0) @ v


def exact_rms_norm(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


# ---- prefill attention -------------------------------------------------------------------------------------
# (H_q, H_kv, T, S, D, dtype, causal, padded): G = H_q // H_kv
PREFILL = [
    (4, 4, 1, 1, 64, torch.float32, True, False),  # G=1, a single token
    (4, 2, 17, 17, 128, torch.float16, True, False),  # G=2
    (14, 2, 64, 64, 64, torch.float32, True, False),  # G=7 (Qwen2-0.5B / 7B), full tiles
    (8, 1, 129, 129, 128, torch.float16, True, False),  # G=8 (72B), ragged tail
    (14, 2, 17, 129, 128, torch.float32, True, False),  # a prefill continuing a cache: bottom-right causal
    (4, 2, 64, 129, 64, torch.bfloat16, True, False),  # bf16 by upcast
    (8, 1, 64, 17, 64, torch.float32, False, False),  # non-causal, T > S
    (2, 2, 129, 64, 128, torch.float16, False, False),
    (14, 2, 17, 17, 64, torch.float32, True, True),  # left padding, ragged per row, one row fully real
    (16, 2, 129, 129, 64, torch.float16, True, True),
]


def _pad_mask(B, S, seed):
    lengths = [S, max(1, S // 3)][:B]
    keep = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        keep[b, S - n:] = True  # left padding: real tokens at the end
    return keep.to(DEVICE)


def attention_reference(q, k, v, visible, dtype):
    """`ops.attention` on the fp32 inputs with `visible` (B|1, 1, T, S) as the model's additive mask."""
    mask = torch.zeros(visible.shape, device=DEVICE).masked_fill(~visible, torch.finfo(torch.float32).min)
    out = ops.attention(q.float(), k.float(), v.float(), mask, q.shape[-1] ** -0.5, TORCH)
    return out.to(dtype)


@needs_kernels
@pytest.mark.parametrize("hq,hkv,T,S,D,dtype,causal,padded", PREFILL,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else None)
def test_flash_attention(hq, hkv, T, S, D, dtype, causal, padded):
    B = 2
    q = rand(B, hq, T, D, dtype=dtype, seed=0, layout_bthd=True)
    k = rand(B, hkv, S, D, dtype=dtype, seed=1, layout_bthd=True)
    v = rand(B, hkv, S, D, dtype=dtype, seed=2)
    keep = _pad_mask(B, S, 3) if padded else None
    out = K.flash_attention(q, k, v, causal=causal, key_padding=keep)
    assert out.shape == (B, hq, T, D) and out.dtype == dtype
    visible = torch.ones(B, 1, T, S, dtype=torch.bool, device=DEVICE)
    if causal:  # bottom-right: query t sits at position S - T + t
        visible &= torch.ones(T, S, dtype=torch.bool, device=DEVICE).tril(S - T)
    if keep is not None:
        visible &= keep[:, None, None, :]
    seen = visible.any(-1, keepdim=True)  # a row that sees nothing: the reference averages, ours gives zeros
    ref = attention_reference(q, k, v, visible, dtype)
    close(out.float().masked_fill(~seen, 0), ref.float().masked_fill(~seen, 0), exact_attention(q, k, v, visible),
          "vs ops.attention")
    if padded:
        assert (out.float().masked_fill(seen, 0) == 0).all(), "a row that sees no key must be zeros"


@needs_kernels
def test_flash_attention_with_the_models_additive_mask():
    # what ops.attention hands the kernel for a prefill: dtype-min where masked, broadcast over batch
    from qwen2_pure.model import attention_mask_4d
    B, hq, hkv, T, S, D, dtype = 2, 7, 1, 17, 64, 64, torch.float16
    q, k, v = (rand(B, h, n, D, dtype=dtype, seed=i) for i, (h, n) in enumerate([(hq, T), (hkv, S), (hkv, S)]))
    padding = torch.ones(B, S, dtype=torch.long, device=DEVICE)
    padding[1, :20] = 0
    for pad, window in [(None, None), (padding, None), (padding, 24)]:
        mask = attention_mask_4d(torch.arange(S - T, S, device=DEVICE), S, pad, window, dtype)
        out = K.flash_attention(q, k, v, causal=False, attn_bias=mask)
        exact = exact_attention(q, k, v, mask == 0)
        close(out, attention_reference(q, k, v, mask == 0, dtype), exact, f"window={window}")
        # and through the switch, as the model calls it: the same kernel, the same bits
        assert torch.equal(ops.attention(q, k, v, mask, D ** -0.5, TRITON), out), f"ops, window={window}"


# ---- decode attention ----------------------------------------------------------------------------------------
# (H_q, H_kv, S_max, D, dtype, lengths, splits): lengths cover 1 and S_max; splits past a length stay empty
DECODE = [
    (4, 4, 17, 64, torch.float32, [1, 17, 9], None),  # G=1
    (4, 2, 64, 128, torch.float16, [64, 1, 33], 3),  # G=2
    (14, 2, 129, 128, torch.float32, [1, 129, 100], 4),  # G=7
    (8, 1, 129, 64, torch.bfloat16, [129, 2, 64], None),  # G=8
    (28, 4, 1, 64, torch.float16, [1, 1, 1], None),  # S_max = 1
]


def decode_reference(q, k, v, seqlens, dtype, keep=None):
    """`ops.attention` for one query token (T = 1) reading slots [0, seqlens[b]) (and `keep`), and the exact
    result (float64)."""
    S = k.shape[2]
    visible = torch.arange(S, device=DEVICE)[None, :] < seqlens[:, None]  # (B, S)
    if keep is not None:
        visible &= keep
    visible = visible[:, None, None, :]
    return (attention_reference(q[:, :, None], k, v, visible, dtype)[:, :, 0],
            exact_attention(q[:, :, None], k, v, visible)[:, :, 0])


@needs_kernels
@pytest.mark.parametrize("hq,hkv,S,D,dtype,lengths,splits", DECODE,
                         ids=lambda v: str(v).replace("torch.", "") if v is not None else "auto")
def test_decode_attention(hq, hkv, S, D, dtype, lengths, splits):
    B = len(lengths)
    q = rand(B, hq, D, dtype=dtype, seed=4)
    k = rand(B, hkv, S, D, dtype=dtype, seed=5)
    v = rand(B, hkv, S, D, dtype=dtype, seed=6)
    seqlens = torch.tensor(lengths, device=DEVICE)
    out = K.decode_attention(q, k, v, seqlens, num_splits=splits)
    assert out.shape == (B, hq, D) and out.dtype == dtype
    close(out, *decode_reference(q, k, v, seqlens, dtype), "vs ops.attention")


@needs_kernels
def test_decode_attention_left_padding_and_cache_views():
    # the model's decode: caches sliced to the live length (strided views), left padding as key_padding
    B, hq, hkv, S_max, D = 2, 14, 2, 64, 64
    k_full = rand(B, hkv, S_max, D, dtype=torch.float32, seed=7)
    v_full = rand(B, hkv, S_max, D, dtype=torch.float32, seed=8)
    q = rand(B, hq, D, dtype=torch.float32, seed=9)
    S = 40
    keep = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    keep[0, :25] = False
    k, v = k_full[:, :, :S], v_full[:, :, :S]
    lens = torch.full((B,), S, device=DEVICE)
    out = K.decode_attention(q, k, v, lens, key_padding=keep, num_splits=3)
    close(out, *decode_reference(q, k, v, lens, torch.float32, keep), "padded decode")


# ---- RMSNorm, RoPE, SwiGLU -----------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(dtype, residual):
    x = rand(3, 5, 896, dtype=dtype, seed=10)
    w = (torch.rand(896, generator=torch.Generator().manual_seed(11)) + 0.5).to(dtype).to(DEVICE)
    if not residual:
        out = K.rms_norm(x, w, 1e-6)
        close(out, ops.rms_norm(x, w, 1e-6, TORCH), exact_rms_norm(x, w, 1e-6), "rms_norm")
        assert torch.equal(ops.rms_norm(x, w, 1e-6, TRITON), out)  # the switch runs the kernel
        return
    h = rand(3, 5, 896, dtype=dtype, seed=12)  # the residual stream; x is the layer's output added to it
    out, h_out = K.rms_norm(x, w, 1e-6, residual=h)
    h_ref, ref = ops.add_rms_norm(h, x, w, 1e-6, TORCH)
    total = h.double() + x.double()
    close(h_out, h_ref, total, "residual sum")
    close(out, ref, exact_rms_norm(total, w, 1e-6), "rms_norm of the sum")
    h_tri, out_tri = ops.add_rms_norm(h, x, w, 1e-6, TRITON)
    assert torch.equal(h_tri, h_out) and torch.equal(out_tri, out)


@needs_kernels
@pytest.mark.parametrize("dtype,hq,hkv,D,T", [(torch.float32, 14, 2, 64, 17), (torch.float16, 8, 1, 128, 1),
                                              (torch.bfloat16, 4, 4, 64, 64)], ids=str)
def test_rope_in_place(dtype, hq, hkv, D, T):
    B = 2
    q = rand(B, hq, T, D, dtype=dtype, seed=13, layout_bthd=True)
    k = rand(B, hkv, T, D, dtype=dtype, seed=14, layout_bthd=True)
    ang = torch.rand(B, T, D // 2, generator=torch.Generator().manual_seed(15)) * 6
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype).to(DEVICE), ang.sin().to(dtype).to(DEVICE)
    q_ref, k_ref = ops.apply_rope(q, k, cos, sin, TORCH)
    c, s = cos.double()[:, None], sin.double()[:, None]
    q_exact, k_exact = (t.double() * c + ops.rotate_half(t.double()) * s for t in (q, k))
    q_ptr = q.data_ptr()
    q_out, k_out = K.rope_(q, k, cos, sin)
    assert q_out.data_ptr() == q_ptr  # in place
    close(q, q_ref, q_exact, "rope q")
    close(k, k_ref, k_exact, "rope k")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_swiglu(dtype):
    gate, up = rand(3, 7, 4864, dtype=dtype, seed=16), rand(3, 7, 4864, dtype=dtype, seed=17)
    exact = torch.nn.functional.silu(gate.double()) * up.double()
    close(K.swiglu(gate, up), ops.swiglu(gate, up, TORCH), exact, "swiglu")


# ---- the switch and the model end to end ----------------------------------------------------------------------

MISSING = "the Triton kernels cannot be imported (simulated)"


def tiny_model():
    from qwen2_pure.config import Qwen2Config
    from qwen2_pure.model import Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_settings_reject_unknown_kernel_choices():
    with pytest.raises(Qwen2PureError, match="kernels='cuda' is invalid"):
        Settings(kernels="cuda")
    with pytest.raises(Qwen2PureError, match="QWEN2_PURE_KERNELS='cuda'"):
        Settings.from_env({"QWEN2_PURE_KERNELS": "cuda"})
    assert Settings.from_env({"QWEN2_PURE_KERNELS": "torch"}).kernels == "torch"


def test_kernels_asked_for_but_not_importable_fail_or_warn(monkeypatch):
    """A checkout where kernels/ is not mapped (or triton is missing): kernels="triton" is an error when the
    model is configured and at every op; "auto" on CUDA warns once, at configure; never a silent fallback."""
    monkeypatch.setattr(ops, "_kernels", MISSING)  # what load_kernels caches when the import fails
    model = tiny_model()
    with pytest.raises(Qwen2PureError, match=r"kernels='triton': the Triton kernels cannot be imported"):
        model.configure(Settings(kernels="triton"))
    assert model.settings.kernels == "auto"  # unchanged by the refused configure
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(Qwen2PureError, match="kernels='triton'"):
        ops.rms_norm(x, w, 1e-6, Settings(kernels="triton"))
    with pytest.warns(UserWarning, match=r"kernels='auto' on cuda: the Triton kernels cannot be imported.*"
                                         "running the PyTorch references"):
        ops.check_kernels(Settings(kernels="auto"), torch.device("cuda"))
    with warnings.catch_warnings():  # "auto" on a CPU and "torch" never want the kernels: nothing to say
        warnings.simplefilter("error")
        model.configure(Settings(kernels="auto"))
        model.configure(Settings(kernels="torch"))
        ops.check_kernels(Settings(kernels="torch"), torch.device("cuda"))
        assert torch.equal(ops.rms_norm(x, w, 1e-6, Settings(kernels="auto")), ops.rms_norm(x, w, 1e-6, TORCH))


def test_torch_never_imports_the_kernels(monkeypatch):
    monkeypatch.setattr(ops, "load_kernels", lambda: pytest.fail("kernels='torch' imported the kernels"))
    model = tiny_model().configure(TORCH)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert ops._triton(TORCH, torch.ones(2, device=DEVICE)) is None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_utils import make_hf_checkpoint
    path = tmp_path_factory.mktemp("kernels_ckpt")
    make_hf_checkpoint(path, heads=14, kv_heads=2, head_dim=64, layers=2)
    return path


@needs_kernels
def test_model_logits_triton_path_equal_reference_path(tiny_checkpoint, monkeypatch):
    """Left-padded prefill then three cached decode steps, once per path (`model.configure`): the Triton path's
    logits no further from the reference path's than PyTorch's own fused attention (SDPA) puts them, here."""
    import torch.nn.functional as F

    import qwen2_pure as q
    from hf_utils import VOCAB
    model = q.load_model(tiny_checkpoint, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB - 2, (2, 20), generator=g).to(DEVICE)
    mask = torch.ones(2, 23, dtype=torch.long, device=DEVICE)
    mask[1, :7] = 0  # row 1 is left-padded
    steps = torch.randint(0, VOCAB - 2, (2, 3), generator=g).to(DEVICE)
    real = mask[:, :20].bool()

    def run(backend):
        model.configure(model.settings.replace(kernels=backend))
        cache = model.new_cache(2, 32)
        out = [model(ids, attention_mask=mask[:, :20], cache=cache, input_pos=torch.arange(20, device=DEVICE))]
        for i in range(3):
            out.append(model(steps[:, i:i + 1], attention_mask=mask[:, :21 + i], cache=cache,
                             input_pos=torch.tensor([20 + i], device=DEVICE)))
        # padded query positions attend to nothing real; only real tokens' logits count
        return torch.cat([out[0][real].flatten()] + [o.flatten() for o in out[1:]])

    ref, tri = run("torch"), run("triton")
    assert ref.abs().max() > 1
    with monkeypatch.context() as m:  # the reference path with PyTorch's SDPA for the attention, on any device
        m.setattr(ops, "attention", lambda q, k, v, mask, scale, settings: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask if isinstance(mask, torch.Tensor) else mask.additive(), scale=scale,
            enable_gqa=q.shape[1] != k.shape[1]))
        sdpa = run("torch")
    assert_within_reference(tri, ref, sdpa, ref, what="Triton path vs the reference path")


@needs_kernels
def test_attention_benchmark_smoke(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, QWEN2_PURE_KERNELS="auto")
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "attention.py"), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KV cache" in r.stdout and (tmp_path / "attention.json").exists()
