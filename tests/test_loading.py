"""The production loader `qwen2_pure.load_model` on HF-layout folders: sharding, dtypes, strictness, corrupt
files, bad configs, source resolution (paths, hub ids), generation_config, and peak memory while loading.

Every user error must be a `Qwen2PureError` whose message names what is wrong (file, tensor, key, shapes);
the tests assert on the message, not only on the type.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen2_pure as q
from hf_utils import VOCAB, make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


# ---- helpers --------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def error(fn, *parts):
    """Call fn, expect a Qwen2PureError whose message contains every one of `parts`; return the message."""
    with pytest.raises(q.Qwen2PureError) as ei:
        fn()
    msg = str(ei.value)
    for p in parts:
        assert str(p) in msg, f"{p!r} not in error message: {msg}"
    return msg


def ids(batch=2, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 2, (batch, length), generator=g)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_ckpt(folder, sd, cfg, *, gen=None, filename="model.safetensors"):
    """An HF-layout folder with config.json, one safetensors file (if sd is not None), generation_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if sd is not None:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / filename), metadata={"format": "pt"})
    if gen is not None:
        (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def write_sharded(folder, sd, cfg, groups):
    """Save `sd` as len(groups) shards (groups: lists of tensor names) with a model.safetensors.index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    weight_map = {}
    n = len(groups)
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in names}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def assert_weights(model, sd, dtype):
    """Every parameter of `model` is `sd`'s tensor cast to `dtype`, bit for bit."""
    got = model.state_dict()
    for name, t in sd.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], t.to(dtype)), name


# ---- fixtures: one tiny transformers checkpoint, variants written with plain safetensors ----------------

@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """(folder, transformers model): an untied 2-layer checkpoint, 4 query / 2 KV heads of head_dim 8."""
    path = tmp_path_factory.mktemp("base")
    model = make_hf_checkpoint(path, heads=4, kv_heads=2, head_dim=8, layers=2, intermediate=64)
    return path, model


@pytest.fixture(scope="module")
def base(hf_ckpt):
    return hf_ckpt[0]


@pytest.fixture(scope="module")
def base_sd(base):
    return load_file(str(base / "model.safetensors"))


@pytest.fixture(scope="module")
def base_cfg(base):
    return json.loads((base / "config.json").read_text())


@pytest.fixture(scope="module")
def ref_logits(base):
    model = q.load_model(base)
    out = model(ids())
    assert out.abs().max() > 1  # logits that vary, not a degenerate model
    return out


@pytest.fixture(scope="module")
def ok_folder(tmp_path_factory, base_sd, base_cfg):
    """A loadable copy of the base checkpoint written by us (for source-resolution tests)."""
    return write_ckpt(tmp_path_factory.mktemp("ok"), base_sd, base_cfg)


# ---- the returned model ---------------------------------------------------------------------------------

def test_base_checkpoint_loads_in_eval_mode_with_generation_config(base, base_sd):
    model = q.load_model(base)
    assert isinstance(model, q.Qwen2ForCausalLM)
    assert not model.training and not any(m.training for m in model.modules())
    assert_weights(model, base_sd, torch.float32)
    assert set(model.state_dict()) == set(base_sd)
    assert model.device == torch.device("cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert model.generation_config.raw == json.loads((base / "generation_config.json").read_text())
    assert model.generation_config.eos_token_id == (VOCAB - 1,)


def test_generation_config_from_config_json_when_absent(tmp_path, base_sd, base_cfg):
    """No generation_config.json: config.json's eos/pad ids and transformers' defaults (greedy), the same as a
    model built directly from the config."""
    folder = write_ckpt(tmp_path, base_sd, base_cfg)
    assert not (folder / "generation_config.json").exists()
    loaded = q.load_model(folder)
    built = q.Qwen2ForCausalLM(loaded.config)
    assert loaded.generation_config == built.generation_config
    assert loaded.generation_config.raw == {} and loaded.generation_config.sampling.greedy
    assert loaded.generation_config.eos_token_id == tuple(loaded.config.eos_ids)


def test_generation_config_custom_values(tmp_path, base_sd, base_cfg):
    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "eos_token_id": [1, 2],
           "repetition_penalty": 1.05, "max_new_tokens": 64}
    g = q.load(write_ckpt(tmp_path, base_sd, base_cfg, gen=gen), tokenizer=False).generation_config
    assert g.raw == gen and g.eos_token_id == (1, 2) and g.max_new_tokens == 64
    assert g.pad_token_id == base_cfg["pad_token_id"]  # not in the file: config.json's
    assert g.sampling == q.SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


def test_generation_config_bad_values_name_file_and_key(tmp_path, base_sd, base_cfg):
    folder = write_ckpt(tmp_path, base_sd, base_cfg, gen={"eos_token_id": "two"})
    error(lambda: q.load_model(folder), "generation_config.json", "eos_token_id")
    folder = write_ckpt(tmp_path / "b", base_sd, base_cfg, gen={"do_sample": True, "top_p": 1.5})
    error(lambda: q.load_model(folder), "generation_config.json", "top_p")


def test_generation_config_not_json_names_file(tmp_path, base_sd, base_cfg):
    folder = write_ckpt(tmp_path, base_sd, base_cfg)
    (folder / "generation_config.json").write_text("{temperature: 0.7")
    error(lambda: q.load_model(folder), "generation_config.json", "JSON")


# ---- sharded checkpoints --------------------------------------------------------------------------------

def three_groups(sd):
    names = sorted(sd)
    return [names[0::3], names[1::3], names[2::3]]


def test_sharded_checkpoint_matches_single_file(tmp_path, base_sd, base_cfg, ref_logits):
    folder = write_sharded(tmp_path, base_sd, base_cfg, three_groups(base_sd))
    assert len(list(folder.glob("*.safetensors"))) == 3
    model = q.load_model(folder)
    assert_weights(model, base_sd, torch.float32)
    assert torch.equal(model(ids()), ref_logits)


def test_sharded_by_transformers_save_pretrained(tmp_path, hf_ckpt, ref_logits):
    _, hf = hf_ckpt
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2
    assert torch.equal(q.load_model(tmp_path)(ids()), ref_logits)


def test_index_naming_a_missing_shard(tmp_path, base_sd, base_cfg):
    folder = write_sharded(tmp_path, base_sd, base_cfg, three_groups(base_sd))
    (folder / "model-00002-of-00003.safetensors").unlink()
    error(lambda: q.load_model(folder), "model.safetensors.index.json", "model-00002-of-00003.safetensors")


def test_tensor_in_index_but_missing_from_its_shard(tmp_path, base_sd, base_cfg):
    groups = three_groups(base_sd)
    folder = write_sharded(tmp_path, base_sd, base_cfg, groups)
    # rewrite shard 2 without one of the tensors the index places there
    victim = groups[1][0]
    shard = folder / "model-00002-of-00003.safetensors"
    save_file({k: base_sd[k].contiguous() for k in groups[1][1:]}, str(shard))
    error(lambda: q.load_model(folder), "model-00002-of-00003.safetensors", victim, "index")


def test_index_not_json(tmp_path, base_sd, base_cfg):
    folder = write_sharded(tmp_path, base_sd, base_cfg, three_groups(base_sd))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    error(lambda: q.load_model(folder), "model.safetensors.index.json")


def test_index_without_weight_map(tmp_path, base_sd, base_cfg):
    folder = write_sharded(tmp_path, base_sd, base_cfg, three_groups(base_sd))
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    error(lambda: q.load_model(folder), "model.safetensors.index.json", "weight_map")


def test_sharded_missing_tensor_is_an_error(tmp_path, base_sd, base_cfg):
    sd = dict(base_sd)
    del sd["model.layers.1.mlp.up_proj.weight"]
    folder = write_sharded(tmp_path, sd, base_cfg, three_groups(sd))
    error(lambda: q.load_model(folder), "missing", "model.layers.1.mlp.up_proj.weight")


# ---- dtypes: cast per tensor, default from config.json ---------------------------------------------------

def test_bf16_stored_loaded_as_fp32_and_as_stored(tmp_path, base_sd, base_cfg):
    sd16 = {k: v.to(torch.bfloat16) for k, v in base_sd.items()}
    folder = write_ckpt(tmp_path, sd16, {**base_cfg, "dtype": "bfloat16"})
    model = q.load_model(folder, dtype=torch.float32)
    assert model.dtype == torch.float32
    assert_weights(model, sd16, torch.float32)  # exact: bf16 -> fp32 is lossless
    auto = q.load_model(folder)  # dtype=None: config.json's dtype
    assert auto.dtype == torch.bfloat16
    assert_weights(auto, sd16, torch.bfloat16)
    assert q.load_model(folder, dtype="auto").dtype == torch.bfloat16
    assert q.load_model(folder, dtype="float32").dtype == torch.float32


def test_fp32_stored_loaded_as_bf16_and_fp16(base, base_sd):
    assert q.load_model(base).dtype == torch.float32  # config.json says float32
    for dtype, name in [(torch.bfloat16, "bfloat16"), (torch.float16, "fp16")]:
        model = q.load_model(base, dtype=name)
        assert_weights(model, base_sd, dtype)
        assert torch.isfinite(model(ids())).all()


def test_torch_dtype_spelling_sets_default_dtype(tmp_path, base_sd, base_cfg):
    cfg = {k: v for k, v in base_cfg.items() if k != "dtype"}
    folder = write_ckpt(tmp_path, base_sd, {**cfg, "torch_dtype": "bfloat16"})
    model = q.load_model(folder)
    assert model.dtype == torch.bfloat16
    assert_weights(model, base_sd, torch.bfloat16)


def test_no_dtype_in_config_defaults_to_fp32(tmp_path, base_sd, base_cfg):
    cfg = {k: v for k, v in base_cfg.items() if k != "dtype"}
    sd16 = {k: v.to(torch.bfloat16) for k, v in base_sd.items()}
    assert q.load_model(write_ckpt(tmp_path, sd16, cfg)).dtype == torch.float32


def test_mixed_dtype_file_is_cast_per_tensor(tmp_path, base_sd, base_cfg):
    kinds = [torch.float32, torch.bfloat16, torch.float16]
    sd = {k: v.to(kinds[i % 3]) for i, (k, v) in enumerate(sorted(base_sd.items()))}
    assert {t.dtype for t in sd.values()} == set(kinds)
    folder = write_ckpt(tmp_path, sd, base_cfg)
    for dtype in kinds:
        model = q.load_model(folder, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert_weights(model, sd, dtype)


def test_unsupported_dtype_argument(base):
    error(lambda: q.load_model(base, dtype="int8"), "int8")
    error(lambda: q.load_model(base, dtype=torch.float64), "float64")


# ---- strictness: missing, unexpected, misshaped tensors ----------------------------------------------------

def test_missing_tensor_names_it(tmp_path, base_sd, base_cfg):
    sd = {k: v for k, v in base_sd.items() if k != "model.layers.1.self_attn.v_proj.bias"}
    folder = write_ckpt(tmp_path, sd, base_cfg)
    error(lambda: q.load_model(folder), str(folder), "missing", "model.layers.1.self_attn.v_proj.bias")


def test_many_missing_tensors_are_summarised(tmp_path, base_sd, base_cfg):
    sd = {k: v for k, v in base_sd.items() if "layers.1." not in k}
    n_missing = len(base_sd) - len(sd)
    assert n_missing > 5
    msg = error(lambda: q.load_model(write_ckpt(tmp_path, sd, base_cfg)), "missing", "model.layers.1.")
    assert f"{n_missing - 5} more" in msg


def test_unexpected_tensor_names_it_and_file(tmp_path, base_sd, base_cfg):
    sd = {**base_sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}
    folder = write_ckpt(tmp_path, sd, base_cfg)
    error(lambda: q.load_model(folder), "model.safetensors", "unexpected", "model.layers.0.self_attn.q_norm.weight")


def test_extra_layer_is_unexpected(tmp_path, base_sd, base_cfg):
    # a 3-layer file with a 2-layer config: the config is for a different model
    sd = {**base_sd, **{k.replace("layers.1.", "layers.2."): v.clone() for k, v in base_sd.items() if "layers.1." in k}}
    error(lambda: q.load_model(write_ckpt(tmp_path, sd, base_cfg)), "unexpected", "model.layers.2.")


def test_rotary_inv_freq_from_old_checkpoints_is_ignored(tmp_path, base_sd, base_cfg, ref_logits):
    sd = {**base_sd, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": randn(4, seed=i) for i in range(2)}}
    assert torch.equal(q.load_model(write_ckpt(tmp_path, sd, base_cfg))(ids()), ref_logits)


def test_misshaped_k_proj_names_tensor_file_and_both_shapes(tmp_path, base_sd, base_cfg):
    good = tuple(base_sd[K_PROJ].shape)  # 2 KV heads x 8 = 16 rows, hidden 32
    assert good == (16, 32)
    sd = {**base_sd, K_PROJ: randn(32, 32)}  # as if the file had 4 KV heads
    folder = write_ckpt(tmp_path, sd, base_cfg)
    error(lambda: q.load_model(folder), "model.safetensors", K_PROJ, "[32, 32]", "[16, 32]")


def test_misshaped_embedding_names_both_shapes(tmp_path, base_sd, base_cfg):
    sd = {**base_sd, "model.embed_tokens.weight": randn(VOCAB + 1, 32)}
    error(lambda: q.load_model(write_ckpt(tmp_path, sd, base_cfg)),
          "model.embed_tokens.weight", f"[{VOCAB + 1}, 32]", f"[{VOCAB}, 32]")


def test_misshaped_norm_with_wrong_rank(tmp_path, base_sd, base_cfg):
    sd = {**base_sd, "model.norm.weight": torch.ones(1, 32)}
    error(lambda: q.load_model(write_ckpt(tmp_path, sd, base_cfg)), "model.norm.weight", "[1, 32]", "[32]")


# ---- tied embeddings ----------------------------------------------------------------------------------------

def test_tied_checkpoint_ignores_lm_head_in_file(tmp_path, base_sd, base_cfg):
    cfg = {**base_cfg, "tie_word_embeddings": True}
    # the file carries an lm_head.weight that differs from embed_tokens: it must be ignored, not loaded
    sd = {**base_sd, "lm_head.weight": base_sd["lm_head.weight"] * 3}
    model = q.load_model(write_ckpt(tmp_path / "with", sd, cfg))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, base_sd["model.embed_tokens.weight"])
    # and it computes exactly what the same checkpoint without lm_head.weight computes
    sd_no_head = {k: v for k, v in base_sd.items() if k != "lm_head.weight"}
    plain = q.load_model(write_ckpt(tmp_path / "without", sd_no_head, cfg))
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert torch.equal(model(ids()), plain(ids()))
    # tying survives a dtype cast at load time
    bf = q.load_model(tmp_path / "with", dtype=torch.bfloat16)
    assert bf.lm_head.weight is bf.model.embed_tokens.weight and bf.dtype == torch.bfloat16


def test_tied_checkpoint_from_transformers(tmp_path):
    make_hf_checkpoint(tmp_path, heads=4, kv_heads=2, head_dim=8, layers=1, intermediate=64, tied=True)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    model = q.load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_checkpoint_without_lm_head_is_missing_tensor(tmp_path, base_sd, base_cfg):
    sd = {k: v for k, v in base_sd.items() if k != "lm_head.weight"}
    assert base_cfg["tie_word_embeddings"] is False
    error(lambda: q.load_model(write_ckpt(tmp_path, sd, base_cfg)), "missing", "lm_head.weight")


# ---- corrupt safetensors files ------------------------------------------------------------------------------

@pytest.fixture
def ckpt_copy(tmp_path, base):
    folder = tmp_path / "ckpt"
    shutil.copytree(base, folder)
    return folder


def test_garbage_file(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(b"this is not a safetensors file at all, just some text\n" * 10)
    error(lambda: q.load_model(ckpt_copy), str(f), "header")


def test_file_shorter_than_header_length(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(b"\x01\x02")
    error(lambda: q.load_model(ckpt_copy), str(f))


def test_header_length_larger_than_file(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])
    error(lambda: q.load_model(ckpt_copy), str(f), "header", str(len(data)))


def test_header_not_json(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[:8] + b"{" + b"\xff" * (n - 2) + b"}" + data[8 + n:])
    error(lambda: q.load_model(ckpt_copy), str(f), "header")


def test_header_json_but_not_an_object(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[:8] + b"[1, 2]".ljust(n) + data[8 + n:])
    error(lambda: q.load_model(ckpt_copy), str(f), "header")


def test_header_entry_with_wrong_byte_count(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header[K_PROJ]["shape"] = [15, 32]  # the data_offsets still span 16 x 32 floats
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    error(lambda: q.load_model(ckpt_copy), str(f), K_PROJ, "[15, 32]")


def test_truncated_file_names_file_and_tensor(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    cut = 8 + n + (len(data) - 8 - n) // 2  # in the middle of the data section
    f.write_bytes(data[:cut])
    msg = error(lambda: q.load_model(ckpt_copy), str(f), "truncated", str(cut))
    # it names a tensor whose data runs past the cut (the one crossing it, or one after it)
    cut_off = [name for name, e in header.items() if 8 + n + e["data_offsets"][1] > cut]
    assert any(f"'{name}'" in msg for name in cut_off), msg


def test_empty_safetensors_file(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(b"")
    error(lambda: q.load_model(ckpt_copy), str(f))


# ---- folders that are not loadable ---------------------------------------------------------------------------

def test_folder_without_weights(tmp_path, base_cfg):
    folder = write_ckpt(tmp_path, None, base_cfg)
    error(lambda: q.load_model(folder), str(folder), "model.safetensors")


def test_folder_with_only_pytorch_model_bin(tmp_path, base_sd, base_cfg):
    folder = write_ckpt(tmp_path, None, base_cfg)
    torch.save(base_sd, folder / "pytorch_model.bin")
    error(lambda: q.load_model(folder), "pytorch_model.bin", "pickle", "safetensors")


def test_missing_config_json(tmp_path, base_sd):
    save_file(dict(base_sd), str(tmp_path / "model.safetensors"))
    error(lambda: q.load_model(tmp_path), "config.json", "not found")


def test_config_json_not_json(tmp_path, base_sd, base_cfg):
    folder = write_ckpt(tmp_path, base_sd, base_cfg)
    (folder / "config.json").write_text('{"model_type": "qwen2",')
    error(lambda: q.load_model(folder), "config.json", "JSON")


def test_config_json_not_an_object(tmp_path, base_sd, base_cfg):
    folder = write_ckpt(tmp_path, base_sd, base_cfg)
    (folder / "config.json").write_text("[1, 2, 3]")
    error(lambda: q.load_model(folder), "config.json")


# ---- config.json contents --------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, parts", [
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"model_type": None}, ["model_type"]),
    ({"sliding_windw": 4096}, ["sliding_windw"]),
    ({"rope_scaling": {"type": "longrope", "factor": 4.0, "original_max_position_embeddings": 32768}},
     ["rope_scaling", "longrope"]),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}, ["rope_scaling", "dynamic"]),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, ["quantiz", "gptq"]),
    ({"quantization_config": {"quant_method": "awq"}}, ["quantiz", "awq"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({"dtype": "float8"}, ["torch_dtype", "float8"]),
    ({"num_key_value_heads": 3}, ["num_attention_heads", "num_key_value_heads=3"]),
    ({"attention_dropout": 0.1}, ["attention_dropout"]),
], ids=["llama", "no-model_type", "unknown-key", "rope-longrope", "rope_parameters-dynamic", "gptq", "awq",
        "gelu", "bad-dtype", "heads-not-divisible", "dropout"])
def test_bad_config_names_the_key(tmp_path, base_sd, base_cfg, change, parts):
    cfg = {**base_cfg, **change}
    cfg = {k: v for k, v in cfg.items() if not (k == "model_type" and v is None)}
    folder = write_ckpt(tmp_path, base_sd, cfg)
    error(lambda: q.load_model(folder), "config.json", *parts)


def test_several_unknown_keys_are_all_named(tmp_path, base_sd, base_cfg):
    folder = write_ckpt(tmp_path, base_sd, {**base_cfg, "foo_bar": 1, "use_qk_norm": True})
    error(lambda: q.load_model(folder), "foo_bar", "use_qk_norm")


def test_old_and_new_config_spellings_load_the_same(tmp_path, base_sd, base_cfg, ref_logits):
    # transformers 5 writes the new spelling: dtype + rope_parameters (+ layer_types)
    assert "dtype" in base_cfg and "rope_parameters" in base_cfg and "rope_theta" not in base_cfg
    new = {**base_cfg, "dtype": "bfloat16"}
    old = {k: v for k, v in base_cfg.items() if k not in ("dtype", "rope_parameters", "layer_types")}
    old.update(torch_dtype="bfloat16", rope_theta=base_cfg["rope_parameters"]["rope_theta"], rope_scaling=None)
    m_new = q.load_model(write_ckpt(tmp_path / "new", base_sd, new))
    m_old = q.load_model(write_ckpt(tmp_path / "old", base_sd, old))
    for key in ("rope_theta", "rope_scaling", "torch_dtype", "hidden_size", "num_key_value_heads"):
        assert getattr(m_new.config, key) == getattr(m_old.config, key), key
    assert m_new.config.rope_theta == m_old.config.rope_theta == 1e6
    assert m_new.dtype == m_old.dtype == torch.bfloat16
    assert torch.equal(m_new(ids()), m_old(ids()))
    # and in fp32 both give exactly the logits of the base checkpoint
    for folder in (tmp_path / "new", tmp_path / "old"):
        assert torch.equal(q.load_model(folder, dtype=torch.float32)(ids()), ref_logits)
    # rope_theta is really read: another theta gives other logits
    other = q.load_model(write_ckpt(tmp_path / "theta", base_sd, {**old, "rope_theta": 1e4}), dtype="float32")
    assert other.config.rope_theta == 1e4
    assert not torch.allclose(other(ids()), ref_logits)


def test_default_rope_parameters_are_not_scaling(tmp_path, base_sd, base_cfg):
    model = q.load_model(write_ckpt(tmp_path, base_sd, base_cfg))
    assert model.config.rope_scaling is None


# ---- sources: paths, non-gguf files, hub ids --------------------------------------------------------------------

def test_path_that_does_not_exist(tmp_path):
    for src in (tmp_path / "nope", str(tmp_path / "nope"), "./nope", "nope.gguf", "a/b/c", "~/qwen2-pure-no-such"):
        error(lambda: q.load_model(src), "no such folder or file")


def test_file_that_is_not_gguf(ok_folder):
    f = ok_folder / "model.safetensors"
    error(lambda: q.load_model(f), str(f), ".gguf")
    error(lambda: q.load_model(ok_folder / "config.json"), "config.json", ".gguf")


def test_hub_id_without_modelscope(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so that no local qwen/Qwen2-7B-Instruct folder can exist
    monkeypatch.setitem(sys.modules, "modelscope", None)  # `import modelscope` raises ImportError
    error(lambda: q.load_model("qwen/Qwen2-7B-Instruct"),
          "qwen/Qwen2-7B-Instruct", "modelscope", 'pip install "qwen2-pure[hub]"')


def fake_modelscope(snapshot_download):
    mod = types.ModuleType("modelscope")
    mod.snapshot_download = snapshot_download
    return mod


def test_hub_download_failure_says_download_elsewhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def offline(model_id, **kw):
        raise ConnectionError("Max retries exceeded with url: https://www.modelscope.cn/api/v1/models")

    monkeypatch.setitem(sys.modules, "modelscope", fake_modelscope(offline))
    msg = error(lambda: q.load_model("qwen/Qwen2-7B-Instruct"),
                "qwen/Qwen2-7B-Instruct", "ConnectionError", "download the model elsewhere")
    assert "DIR" in msg or "folder" in msg  # and says to pass the downloaded folder


def test_hub_download_success_loads_the_snapshot(monkeypatch, tmp_path, ok_folder, base_sd):
    monkeypatch.chdir(tmp_path)
    calls = []

    def snapshot(model_id, **kw):
        calls.append((model_id, kw))
        return str(ok_folder)

    monkeypatch.setitem(sys.modules, "modelscope", fake_modelscope(snapshot))
    model = q.load_model("qwen/Qwen2-7B-Instruct")
    assert_weights(model, base_sd, torch.float32)
    [(model_id, kw)] = calls
    assert model_id == "qwen/Qwen2-7B-Instruct"
    patterns = kw.get("allow_patterns") or []
    assert "*.safetensors" in patterns and "*.json" in patterns


def test_local_folder_named_like_a_hub_id_is_not_downloaded(monkeypatch, tmp_path, base_sd, base_cfg):
    monkeypatch.chdir(tmp_path)
    write_ckpt(tmp_path / "qwen" / "Qwen2-7B-Instruct", base_sd, base_cfg)
    monkeypatch.setitem(sys.modules, "modelscope", None)
    assert_weights(q.load_model("qwen/Qwen2-7B-Instruct"), base_sd, torch.float32)


def test_path_objects_strings_and_device_argument(ok_folder, base_sd):
    for src in (ok_folder, str(ok_folder)):
        model = q.load_model(src, device="cpu")
        assert model.device == torch.device("cpu")
        assert_weights(model, base_sd, torch.float32)


# ---- peak memory while loading ------------------------------------------------------------------------------------

_MAKE_BIG = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    out = Path(sys.argv[1])
    H, I, V, L, heads, kv = 1024, 2816, 32000, 2, 16, 4
    D = H // heads
    g = torch.Generator().manual_seed(0)
    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.02
    sd = {"model.embed_tokens.weight": w(V, H), "lm_head.weight": w(V, H), "model.norm.weight": torch.ones(H)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": w(heads * D, H), p + "self_attn.q_proj.bias": w(heads * D),
            p + "self_attn.k_proj.weight": w(kv * D, H), p + "self_attn.k_proj.bias": w(kv * D),
            p + "self_attn.v_proj.weight": w(kv * D, H), p + "self_attn.v_proj.bias": w(kv * D),
            p + "self_attn.o_proj.weight": w(H, heads * D),
            p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I),
        })
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": V, "hidden_size": H,
           "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": heads,
           "num_key_value_heads": kv, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "tie_word_embeddings": False}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        d = out / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).split(".")[-1]}))
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(d / "model.safetensors"))
    print(sum(t.numel() for t in sd.values()) * 4)
""")

_MEASURE = textwrap.dedent("""
    import json, sys, torch, qwen2_pure
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    model = qwen2_pure.load_model(sys.argv[1], dtype=sys.argv[2])
    peak = status("VmHWM")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": peak, "weights": nbytes, "dtype": str(model.dtype)}))
""")


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """~350 MB of fp32 weights (hidden 1024, 2 layers, vocab 32000, untied), stored as fp32 and as bf16."""
    out = tmp_path_factory.mktemp("big")
    r = subprocess.run([sys.executable, "-c", _MAKE_BIG, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out, int(r.stdout.split()[-1])


def measure_load(path, dtype):
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path), dtype], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_peak_rss_while_loading_stays_near_weight_size(big_ckpt, stored):
    folder, fp32_bytes = big_ckpt
    assert 300e6 < fp32_bytes < 400e6
    m = measure_load(folder / stored, "float32")
    assert m["dtype"] == "torch.float32" and m["weights"] == fp32_bytes
    grown = m["peak"] - m["base"]
    assert grown <= 1.3 * fp32_bytes, (
        f"{stored} -> fp32: peak RSS grew by {grown / 1e6:.0f} MB for {fp32_bytes / 1e6:.0f} MB of weights "
        f"({grown / fp32_bytes:.2f}x)")
    assert grown >= 0.9 * fp32_bytes  # sanity: the weights really are resident


def test_use_mrope_false_is_accepted_and_true_refused():
    from qwen2_pure.config import Qwen2Config
    from qwen2_pure.presets import get_preset, config_json
    d = config_json(get_preset("Qwen2.5-7B"))
    assert d.get("use_mrope") is False  # as in the official Qwen2.5 base config.json
    assert Qwen2Config.from_dict(d).hidden_size == 3584
    with pytest.raises(q.Qwen2PureError, match="use_mrope"):
        Qwen2Config.from_dict({**d, "use_mrope": True})


# ---- convert_gguf in another dtype ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_converted_folder_in_dtype_loads_as_that_dtype(tiny_gguf, tmp_path, dtype):
    """convert_gguf(dtype=) writes the GGUF's dequantized values cast once; load_model reads that dtype from
    config.json and gets the same weights as loading the GGUF in that dtype."""
    from qwen2_pure.loading.gguf import convert_gguf
    out = convert_gguf(tiny_gguf, tmp_path / dtype, progress=False, dtype=dtype)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    folder = q.load_model(out)  # dtype None: config.json's torch_dtype
    direct = q.load_model(tiny_gguf, dtype=dtype)
    assert folder.dtype == getattr(torch, dtype)
    a, b = folder.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_convert_refuses_an_unknown_dtype_before_writing(tiny_gguf, tmp_path):
    from qwen2_pure.loading.gguf import convert_gguf
    error(lambda: convert_gguf(tiny_gguf, tmp_path / "out", progress=False, dtype="int8"), "dtype='int8'")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
