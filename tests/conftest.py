# The parity tests compare against transformers' eager attention bit for bit (where the machine's GEMMs allow
# it: hf_utils.assert_same_op_order), which is qwen2-pure's exact mode (QWEN2_PURE_FAST=0). The fast CPU paths
# (SDPA, fp32 GEMMs for bf16 prompts) are bounded by transformers' own distances in tests/test_fast.py, which
# turns them on where it needs them.
import os as _os_fast

_os_fast.environ.setdefault("QWEN2_PURE_FAST", "0")

# torch.compile's on-disk kernel cache does not tell kernels built for AVX-512 from kernels built under
# ATEN_CPU_CAPABILITY=avx2: a run that loads the other one's kernels gets NaN logits or a corrupted heap
# ("free(): invalid pointer"). So the suite keeps one cache per capability (subprocesses inherit it).
if "TORCHINDUCTOR_CACHE_DIR" not in _os_fast.environ:
    import getpass as _getpass
    import tempfile as _tempfile

    _os_fast.environ["TORCHINDUCTOR_CACHE_DIR"] = _os_fast.path.join(
        _tempfile.gettempdir(), f"torchinductor_{_getpass.getuser()}_tests_"
        f"{_os_fast.environ.get('ATEN_CPU_CAPABILITY', '').strip().lower() or 'default'}")



# ---- GGUF fixtures (tests/test_gguf.py) -------------------------------------------------------------------
# Tiny qwen2 GGUF files written with gguf.GGUFWriter: 14 query heads / 2 KV heads (group size 7) of
# head_dim 16, so hidden 224 is a multiple of the 32-value blocks of Q8_0/Q5_0, and intermediate 256 lets
# ffn_down rows hold one 256-value K-quant block. gguf's numpy code cannot quantize K-quants, so those
# tensors are random but well-formed raw blocks (small f16 scales); their reference values are whatever
# gguf.quants.dequantize makes of them.

import pytest as _pytest

TINY_GGUF = dict(hidden=224, heads=14, kv_heads=2, layers=2, intermediate=256, context=256)
TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_vocab():
    """256 byte-level tokens, a few merges, 3 control tokens, padded with unused rows like llama.cpp."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    spell = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in spell:
            spell[b] = chr(256 + n)
            n += 1
    tokens = [spell[b] for b in range(256)]
    merges = ["Ġ t", "h e", "i n", "Ġt he", "e r", "Ġ a"]
    tokens += [m.replace(" ", "") for m in merges]
    types = [1] * len(tokens)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    first_special = len(tokens)
    tokens += specials
    types += [3] * len(specials)
    rows = 272
    tokens += [f"[PAD{i}]" for i in range(len(tokens), rows)]
    types += [5] * (rows - len(types))
    return tokens, types, merges, first_special, rows


def write_tiny_gguf(path, *, tied=False, arch="qwen2", seed=0, rope_scaling=None, extra_tensors=(),
                    drop_tensors=(), name="Tiny Qwen2 test model", pad_token="<|endoftext|>", eot_token=None):
    """Write a tiny qwen2 GGUF to `path` and return the path. Tensor types cover F32, F16, BF16, Q8_0, Q5_0,
    Q4_0 and the K-quants Q6_K and Q4_K. pad_token / eot_token: the text of the token that
    padding_token_id / eot_token_id name (a control token in the first unused row if the vocab lacks it)."""
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as T

    c = TINY_GGUF
    H, I, L, nh, nkv = c["hidden"], c["intermediate"], c["layers"], c["heads"], c["kv_heads"]
    D = H // nh
    tokens, types, merges, first_special, V = _tiny_vocab()
    for text in (pad_token, eot_token):
        if text is not None and text not in tokens:
            row = types.index(5)
            tokens[row], types[row] = text, 3
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return rng.normal(0, 0.08, size=shape).astype(np.float32)

    def kquant(rows, cols, qtype):
        nb = rows * cols // 256
        if qtype == T.Q6_K:
            blocks = rng.integers(0, 256, size=(nb, 210), dtype=np.uint8)
            blocks[:, 192:208] = rng.integers(-20, 21, size=(nb, 16), dtype=np.int8).view(np.uint8)
            blocks[:, 208:210] = np.full((nb, 1), 4e-4, dtype=np.float16).view(np.uint8)
        else:  # Q4_K: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit values
            blocks = rng.integers(0, 256, size=(nb, 144), dtype=np.uint8)
            blocks[:, 0:2] = np.full((nb, 1), 1.5e-4, dtype=np.float16).view(np.uint8)
            blocks[:, 2:4] = np.full((nb, 1), 1e-4, dtype=np.float16).view(np.uint8)
        return blocks.reshape(rows, -1)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(c["context"])
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        w.add_rope_scaling_factor(rope_scaling["factor"])
        if "original_context_length" in rope_scaling:
            w.add_rope_scaling_orig_ctx_len(rope_scaling["original_context_length"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(first_special + 2)
    w.add_pad_token_id(tokens.index(pad_token))
    if eot_token is not None:
        w.add_eot_token_id(tokens.index(eot_token))
    w.add_bos_token_id(first_special)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_TEMPLATE)

    def add(name, arr, qtype=T.F32):
        if name in drop_tensors:
            return
        if qtype in (T.Q6_K, T.Q4_K):
            w.add_tensor(name, kquant(*arr.shape, qtype), raw_dtype=qtype)
        elif qtype == T.F32:
            w.add_tensor(name, arr)
        elif qtype == T.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", weight(V, H), T.Q8_0 if tied else T.Q5_0)
    for i in range(L):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", rng.uniform(0.5, 1.5, H).astype(np.float32))
        add(p + "attn_q.weight", weight(nh * D, H), T.F16)
        add(p + "attn_q.bias", rng.normal(0, 0.5, nh * D).astype(np.float32))
        add(p + "attn_k.weight", weight(nkv * D, H), T.Q8_0)
        add(p + "attn_k.bias", rng.normal(0, 0.5, nkv * D).astype(np.float32))
        add(p + "attn_v.weight", weight(nkv * D, H), T.Q8_0 if i == 0 else T.BF16)
        add(p + "attn_v.bias", rng.normal(0, 0.5, nkv * D).astype(np.float32))
        add(p + "attn_output.weight", weight(H, nh * D), T.Q4_0 if i == 0 else T.F32)
        add(p + "ffn_norm.weight", rng.uniform(0.5, 1.5, H).astype(np.float32))
        add(p + "ffn_gate.weight", weight(I, H), T.Q8_0)
        add(p + "ffn_up.weight", weight(I, H), T.Q5_0 if i == 0 else T.F16)
        add(p + "ffn_down.weight", weight(H, I), T.Q6_K if i == 0 else T.Q4_K)
    add("output_norm.weight", rng.uniform(0.5, 1.5, H).astype(np.float32))
    if not tied:
        add("output.weight", weight(V, H), T.Q8_0)
    for name, arr in extra_tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@_pytest.fixture(scope="session")
def make_tiny_gguf():
    """The tiny-GGUF writer, for tests that need a variant (another architecture, a missing tensor, ...)."""
    return write_tiny_gguf


@_pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """An untied tiny qwen2 GGUF (separate output.weight), shared by the session: do not modify it."""
    _pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-untied.gguf", tied=False)


@_pytest.fixture(scope="session")
def tiny_gguf_tied(tmp_path_factory):
    """A tied tiny qwen2 GGUF (no output.weight), shared by the session: do not modify it."""
    _pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-tied.gguf", tied=True, seed=1)


# ---- Tokenizer fixtures (tests/test_tokenizer.py) ---------------------------------------------------------

@_pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory):
    """A folder with the tokenizer.json, tokenizer_config.json and generation_config.json rebuilt from the
    demo GGUF's metadata (Qwen2.5-Coder-0.5B-Instruct). Skips when the demo packages or gguf are missing."""
    import json

    from qwen2_pure.errors import Qwen2PureError
    try:
        import gguf  # noqa: F401  (the demo needs it; skip when it is missing)
        from qwen2_pure.loading.demo import demo_gguf_path
        path = demo_gguf_path()
    except (ImportError, Qwen2PureError) as e:
        _pytest.skip(f"demo checkpoint not available: {e}")
    from qwen2_pure.loading.gguf import open_gguf  # a faster gguf.GGUFReader, cached for the session
    from qwen2_pure.loading.gguf_tokenizer import gguf_tokenizer_files
    text, tokenizer_config, generation_config = gguf_tokenizer_files(open_gguf(path))
    out = tmp_path_factory.mktemp("demo_tokenizer")
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
                                               encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2), encoding="utf-8")
    return out


# ---- Triton kernels (tests/test_kernels.py) ----------------------------------------------------------------
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when qwen2_pure.kernels is first imported,
# wherever in the pytest process that happens. Without a GPU, switch the interpreter on here, before any test
# module is collected. (qwen2_pure itself never imports triton at import time.)

import os as _os

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
