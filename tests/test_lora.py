"""LoRA (qwen2_pure/lora.py): peft-format adapters in both directions, merging, export, strict loading, CLI.

The reference is peft itself on a tiny random transformers Qwen2 (4 query / 2 KV heads of 16, 2 layers, so
the file runs in seconds). Adapters made by peft are loaded by our `load_model(adapter=)`,
adapters made by us are loaded by `PeftModel.from_pretrained`; logits must agree within 1e-5 in fp32.
lora_B is randomized in every adapter (peft and we both start it at zero), so the LoRA path really counts.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_utils import load_hf, make_hf_checkpoint

import qwen2_pure
from qwen2_pure import Qwen2PureError
from qwen2_pure.lora import (ALL_TARGETS, LoraLinear, apply_lora, load_adapter, lora_modules, lora_state_dict,
                             merge_lora, save_adapter)

peft = pytest.importorskip("peft")
IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128, 250, 1, 64, 33]])
ATOL = 1e-5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_base")
    make_hf_checkpoint(d, heads=4, kv_heads=2, head_dim=16, layers=2, intermediate=96, seed=3)
    return d


@pytest.fixture(scope="module")
def base_logits(base_dir):
    with torch.no_grad():
        return load_hf(base_dir)(IDS).logits


def _randomize(params, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_peft_adapter(base_dir, out, seed=0, **cfg):
    """A peft LoRA adapter with random lora_B, saved by peft; returns (dir, peft model)."""
    from peft import LoraConfig, get_peft_model
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    kw.update(cfg)
    pm = get_peft_model(load_hf(base_dir), LoraConfig(task_type="CAUSAL_LM", **kw)).eval()
    _randomize([p for n, p in pm.named_parameters() if "lora_B" in n], seed)
    pm.save_pretrained(out)
    return Path(out), pm


def ours(source, **kw):
    model = qwen2_pure.load_model(source, **kw)
    with torch.no_grad():
        return model, model(IDS)


# ---- peft -> ours ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {},
    dict(target_modules=list(ALL_TARGETS), use_rslora=True),
    dict(target_modules=r".*\.(q|o|down)_proj", r=4, lora_alpha=8),  # a regex string: fullmatch
    dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 4}, alpha_pattern={"up_proj": 3}),
    dict(target_modules=["k_proj", "gate_proj"], layers_to_transform=[1]),
], ids=["qv", "all-rslora", "regex", "rank-pattern", "layers-to-transform"])
def test_peft_adapter_in_our_model(base_dir, base_logits, tmp_path, cfg):
    adir, pm = make_peft_adapter(base_dir, tmp_path / "a", **cfg)
    with torch.no_grad():
        ref = pm(IDS).logits
    model, got = ours(base_dir, adapter=adir)
    assert (ref - base_logits).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # the same modules are wrapped, with the same ranks
    peft_mods = {n.removeprefix("base_model.model."): m.r["default"]
                 for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert {n: m.r for n, m in lora_modules(model).items()} == peft_mods
    assert not any(p.requires_grad for p in model.parameters())  # inference: all frozen


def test_peft_adapter_bf16_file_and_bin_fallback(base_dir, tmp_path):
    """A bf16 adapter file is upcast to the fp32 LoRA dtype; adapter_model.bin is read when there is no safetensors."""
    from safetensors.torch import load_file
    adir, _ = make_peft_adapter(base_dir, tmp_path / "a")
    sd = load_file(adir / "adapter_model.safetensors")
    (adir / "adapter_model.safetensors").unlink()
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, adir / "adapter_model.bin")
    model = qwen2_pure.load_model(base_dir, adapter=adir)
    for k, v in lora_state_dict(model).items():
        assert v.dtype == torch.float32
        assert torch.equal(v, sd[k].to(torch.bfloat16).float())


# ---- ours -> peft ------------------------------------------------------------------------------------------

def make_our_adapter(base_dir, out, targets=("q_proj", "v_proj"), r=8, alpha=16, use_rslora=False, seed=1):
    model = apply_lora(qwen2_pure.load_model(base_dir), targets=targets, r=r, alpha=alpha, use_rslora=use_rslora)
    _randomize([m.lora_B.weight for m in lora_modules(model).values()], seed)
    save_adapter(model, out, base_model_name_or_path="tiny/base")
    return Path(out), model


@pytest.mark.parametrize("targets, r, alpha, rslora", [
    (["q_proj", "v_proj"], 8, 16, False),
    ("all", 4, 16, True),
    ("q_proj,o_proj", 6, 5, False),  # LLaMA-Factory's comma form
], ids=["qv", "all-rslora", "comma"])
def test_our_adapter_in_peft(base_dir, base_logits, tmp_path, targets, r, alpha, rslora):
    from peft import PeftModel
    adir, model = make_our_adapter(base_dir, tmp_path / "a", targets, r, alpha, rslora)
    with torch.no_grad():
        got = model(IDS)
    cfg = json.loads((adir / "adapter_config.json").read_text())
    portable = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
                "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
                "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r",
                "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora"}
    assert set(cfg) == portable and list(cfg) == sorted(cfg)
    assert cfg["r"] == r and cfg["lora_alpha"] == alpha and cfg["use_rslora"] == rslora
    assert cfg["base_model_name_or_path"] == "tiny/base"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(load_hf(base_dir), adir).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()
           or "unexpected" in str(w.message).lower() or "higher version" in str(w.message).lower()]
    assert not bad, bad
    # every tensor of ours landed in peft's model, and peft has no LoRA tensor we did not write
    ours_sd = lora_state_dict(model)
    peft_sd = {n.replace(".default.", "."): p for n, p in pm.named_parameters() if "lora_" in n}
    assert set(peft_sd) == set(ours_sd)
    for k, v in ours_sd.items():
        assert torch.equal(peft_sd[k], v), k
    with torch.no_grad():
        ref = pm(IDS).logits
    assert (ref - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_save_load_roundtrip(base_dir, tmp_path):
    adir, model = make_our_adapter(base_dir, tmp_path / "a", "all", r=4, alpha=8, use_rslora=True)
    with torch.no_grad():
        want = model(IDS)
    m2, got = ours(base_dir, adapter=adir)
    assert torch.equal(got, want)
    # a loaded adapter saves back the same config (read off its layers; the base is named by the caller)
    save_adapter(m2, tmp_path / "b", base_model_name_or_path="tiny/base")
    a = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert a == b
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    assert not hasattr(m2, "lora_config") and not hasattr(model, "lora_config")  # nothing attached to the model


@pytest.mark.parametrize("cfg, targets", [
    (dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 4}, alpha_pattern={"up_proj": 3}),
     ["q_proj", "up_proj", "v_proj"]),
    (dict(target_modules=["k_proj", "gate_proj"], layers_to_transform=[1]),
     ["model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.k_proj"]),
    (dict(target_modules=r".*\.(q|o|down)_proj", r=4, lora_alpha=8), ["down_proj", "o_proj", "q_proj"]),
], ids=["rank-pattern", "layers-to-transform", "regex"])
def test_adapter_config_is_read_off_the_layers(base_dir, tmp_path, cfg, targets):
    """A peft adapter loaded into our model and saved again: the config written is derived from the LoRA layers
    (which modules, ranks, alphas), and peft reads it back to the same model."""
    from peft import PeftModel
    from qwen2_pure.lora import adapter_config
    adir, pm = make_peft_adapter(base_dir, tmp_path / "a", **cfg)
    model, got = ours(base_dir, adapter=adir)
    save_adapter(model, tmp_path / "b", base_model_name_or_path="tiny/base")
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert written == adapter_config(model, "tiny/base") and written["target_modules"] == targets
    assert written["base_model_name_or_path"] == "tiny/base"
    ranks = {n: m.r for n, m in lora_modules(model).items()}
    assert {n: r for n, r in ranks.items() if r != written["r"]} == written["rank_pattern"]
    with torch.no_grad():
        again = PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "b").eval()
        torch.testing.assert_close(again(IDS).logits, pm(IDS).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(got, pm(IDS).logits, atol=ATOL, rtol=0)
    assert {n.removeprefix("base_model.model.") for n, m in again.named_modules()
            if isinstance(m, peft.tuners.lora.Linear)} == set(ranks)



@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(base_dir, tmp_path, umask):
    """Adapter files and export folders get an ordinary file's mode (0666/0777 less the umask), not the
    0600/0700 of a temp file."""
    from qwen2_pure.loading.export import export_merged
    old = os.umask(umask)
    try:
        adir, _ = make_our_adapter(base_dir, tmp_path / "a")
        out = export_merged(base_dir, adir, tmp_path / "merged")
    finally:
        os.umask(old)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (adir / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name

# ---- the layer ---------------------------------------------------------------------------------------------

def test_fresh_lora_is_identity_and_only_lora_trains(base_dir, base_logits):
    model = apply_lora(qwen2_pure.load_model(base_dir), targets="all", r=8, alpha=16)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base_logits, atol=ATOL, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in lora_modules(model) for x in "AB"}
    assert len(lora_modules(model)) == 2 * len(ALL_TARGETS)
    for m in lora_modules(model).values():
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in))
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.5 * bound
        assert not m.lora_B.weight.any()
    # the base checkpoint's names are unchanged by wrapping
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())
    assert "model.layers.0.self_attn.q_proj.bias" in dict(model.named_parameters())


def test_scaling_and_dropout_on_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(3, 16)
    ref = base(x)
    lin = LoraLinear(base, r=4, alpha=8, dropout=0.5)
    assert lin.scaling == 2.0 and LoraLinear(nn.Linear(4, 4), r=4, alpha=8, use_rslora=True).scaling == 4.0
    lin.train()
    torch.testing.assert_close(lin(x), ref)  # B = 0: dropout must not touch the base path
    _randomize([lin.lora_B.weight])
    y1, y2 = lin(x), lin(x)
    assert not torch.equal(y1, y2)  # dropout is active on the branch in training
    lin.eval()
    want = ref + (x @ lin.lora_A.weight.T @ lin.lora_B.weight.T) * 2.0
    torch.testing.assert_close(lin(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_fp32_lora_matches_peft_exactly(dtype):
    """LoRA params stay fp32 under a half-precision base, and forward/merge round exactly as peft's."""
    from peft import LoraConfig, get_peft_model

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 24)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    m = M().to(dtype)
    x = torch.randn(5, 32).to(dtype)
    pm = get_peft_model(M().to(dtype), LoraConfig(r=4, lora_alpha=16, target_modules=["proj"])).eval()
    pm.base_model.model.proj.base_layer.load_state_dict(m.proj.state_dict())
    ours_m = apply_lora(m, targets=["proj"], r=4, alpha=16)
    lin = ours_m.proj
    assert lin.lora_A.weight.dtype == torch.float32 and lin.weight.dtype == dtype
    _randomize([lin.lora_A.weight, lin.lora_B.weight], std=0.3)
    pl = pm.base_model.model.proj
    assert pl.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(lin.lora_A.weight)
        pl.lora_B["default"].weight.copy_(lin.lora_B.weight)
        got, ref = ours_m(x), pm(x)
    assert got.dtype == dtype and torch.equal(got, ref)
    merged = merge_lora(ours_m)
    assert type(merged.proj) is nn.Linear
    assert torch.equal(merged.proj.weight, pm.merge_and_unload().proj.weight)


# ---- merge and export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [{}, dict(target_modules=list(ALL_TARGETS), use_rslora=True)], ids=["qv", "all"])
def test_merge_matches_merge_and_unload(base_dir, tmp_path, cfg):
    adir, pm = make_peft_adapter(base_dir, tmp_path / "a", **cfg)
    with torch.no_grad():
        unmerged = pm(IDS).logits
        ref = pm.merge_and_unload()(IDS).logits
    model = merge_lora(qwen2_pure.load_model(base_dir, adapter=adir))
    assert not lora_modules(model)
    assert all(type(model.get_submodule(f"model.layers.0.self_attn.{t}")) is nn.Linear for t in ("q_proj", "v_proj"))
    with torch.no_grad():
        got = model(IDS)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, unmerged, atol=1e-4, rtol=0)


def test_export_loads_in_transformers(base_dir, tmp_path, capsys):
    from qwen2_pure.cli import main
    adir, pm = make_peft_adapter(base_dir, tmp_path / "a", target_modules=list(ALL_TARGETS))
    (base_dir / "tokenizer_config.json").write_text('{"model_max_length": 256}')  # copied along when present
    out = tmp_path / "merged"
    assert main(["export", "--model", str(base_dir), "--adapter", str(adir), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                "tokenizer_config.json"}
    with torch.no_grad():
        ref = pm.merge_and_unload()(IDS).logits
        hf = load_hf(out)(IDS).logits
    torch.testing.assert_close(hf, ref, atol=ATOL, rtol=0)
    _, got = ours(out)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # an existing output folder is refused without --overwrite, then replaced with it
    capsys.readouterr()
    assert main(["export", "--model", str(base_dir), "--adapter", str(adir), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(base_dir), "--adapter", str(adir), "--output", str(out), "--dtype",
                 "bf16", "--overwrite"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "bfloat16"
    assert qwen2_pure.load_model(out).dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]



@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_tied")
    make_hf_checkpoint(d, heads=4, kv_heads=2, head_dim=16, layers=2, intermediate=96, seed=4, tied=True)
    return d


@pytest.mark.parametrize("targets", [["lm_head"], ["q_proj", "lm_head"]], ids=["head", "q+head"])
def test_lora_on_a_tied_head_merges_into_an_untied_head(tied_dir, tmp_path, targets):
    """lm_head shares embed_tokens' weight: merging must not add the head's delta to the embedding."""
    from qwen2_pure.loading.export import export_merged
    model = apply_lora(qwen2_pure.load_model(tied_dir), targets=targets)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _randomize([m.lora_B.weight for m in lora_modules(model).values()])
    embedding = model.model.embed_tokens.weight.clone()
    save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        unmerged = model(IDS)
        # peft computes the same unmerged logits (it warns about the tied target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = peft.PeftModel.from_pretrained(load_hf(tied_dir), tmp_path / "a").eval()(IDS).logits
        torch.testing.assert_close(unmerged, ref, atol=ATOL, rtol=0)
        merge_lora(model)
        assert torch.equal(model.model.embed_tokens.weight, embedding)
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert not model.config.tie_word_embeddings
        torch.testing.assert_close(model(IDS), unmerged, atol=1e-4, rtol=0)  # was off by 2.2 (head) / 3.0 (q+head)
    out = export_merged(tied_dir, tmp_path / "a", tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    from qwen2_pure.safetensors_io import SafetensorsFile
    with SafetensorsFile(out / "model.safetensors") as f:
        assert "lm_head.weight" in f.names() and torch.equal(f.get("model.embed_tokens.weight"), embedding)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(IDS).logits, unmerged, atol=1e-4, rtol=0)
        torch.testing.assert_close(qwen2_pure.load_model(out)(IDS), unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["q_proj", "embed_tokens"], r".*(q_proj|embed_tokens)"])
def test_embedding_target_is_refused_before_anything_is_wrapped(tied_dir, targets):
    model = qwen2_pure.load_model(tied_dir)
    with pytest.raises(Qwen2PureError, match=r"target 'model\.embed_tokens' is a Embedding; LoRA wraps linear"):
        apply_lora(model, targets=targets)
    assert not lora_modules(model)

# ---- strict loading ----------------------------------------------------------------------------------------

@pytest.fixture
def our_adapter(base_dir, tmp_path):
    return make_our_adapter(base_dir, tmp_path / "a")[0]


def _edit_tensors(adir, fn):
    from safetensors.torch import load_file, save_file
    sd = fn(load_file(adir / "adapter_model.safetensors"))
    save_file(sd, adir / "adapter_model.safetensors", metadata={"format": "pt"})


def _edit_config(adir, **kw):
    cfg = json.loads((adir / "adapter_config.json").read_text())
    cfg.update(kw)
    (adir / "adapter_config.json").write_text(json.dumps(cfg))


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _load_error(base_dir, adir) -> str:
    with pytest.raises(Qwen2PureError) as e:
        qwen2_pure.load_model(base_dir, adapter=adir)
    return str(e.value)


def test_missing_tensor(base_dir, our_adapter):
    _edit_tensors(our_adapter, lambda sd: {k: v for k, v in sd.items() if k != KEY})
    msg = _load_error(base_dir, our_adapter)
    assert "adapter_model.safetensors" in msg and "missing" in msg and KEY in msg


def test_unexpected_tensor(base_dir, our_adapter):
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _edit_tensors(our_adapter, lambda sd: {**sd, extra: torch.zeros(8, 64)})
    msg = _load_error(base_dir, our_adapter)
    assert "adapter_model.safetensors" in msg and "unexpected" in msg and extra in msg


def test_unprefixed_tensor_names(base_dir, our_adapter):
    _edit_tensors(our_adapter, lambda sd: {k.removeprefix("base_model.model."): v for k, v in sd.items()})
    assert "base_model.model." in _load_error(base_dir, our_adapter)


def test_misshaped_tensor(base_dir, our_adapter):
    _edit_config(our_adapter, r=4)
    msg = _load_error(base_dir, our_adapter)
    assert "adapter_model.safetensors" in msg and "shape" in msg and "[8, 64]" in msg and "[4, 64]" in msg


@pytest.mark.parametrize("key, value, words", [
    ("use_dora", True, "DoRA"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "lora_only", "bias"),
    ("peft_type", "IA3", "LoRA"),
    ("target_modules", ["nonexistent"], "match no module"),
    ("target_modules", ["mlp"], "linear layers only"),
])
def test_unsupported_config(base_dir, our_adapter, key, value, words):
    _edit_config(our_adapter, **{key: value})
    msg = _load_error(base_dir, our_adapter)
    assert words in msg and "adapter_config.json" in msg


def test_missing_files(base_dir, tmp_path, our_adapter):
    assert "not found" in _load_error(base_dir, tmp_path / "nope")
    (our_adapter / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors" in _load_error(base_dir, our_adapter)
    (our_adapter / "adapter_config.json").unlink()
    assert "adapter_config.json" in _load_error(base_dir, our_adapter)


def test_newer_peft_keys_are_tolerated(base_dir, our_adapter):
    _edit_config(our_adapter, peft_version="0.99.0", eva_config=None, corda_config=None, use_dora=False)
    qwen2_pure.load_model(base_dir, adapter=our_adapter)


def test_load_adapter_trainable(base_dir, our_adapter):
    model = load_adapter(qwen2_pure.load_model(base_dir), our_adapter, trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in lora_modules(model) for x in "AB"} and trainable


def test_gguf_base_adapter_and_export(tiny_gguf, tmp_path):
    """An adapter on a GGUF base: saved, reloaded unmerged, and exported to a folder our loader reads."""
    model = apply_lora(qwen2_pure.load_model(tiny_gguf), targets=["q_proj", "down_proj"], r=4, alpha=8)
    _randomize([m.lora_B.weight for m in lora_modules(model).values()])
    save_adapter(model, tmp_path / "a")
    ids = torch.tensor([[1, 2, 3, 40, 50, 60]])
    with torch.no_grad():
        want = model(ids)
        got = qwen2_pure.load_model(tiny_gguf, adapter=tmp_path / "a")(ids)
        assert torch.equal(got, want)
        from qwen2_pure.loading.export import export_merged
        out = export_merged(tiny_gguf, tmp_path / "a", tmp_path / "merged")
        assert (out / "tokenizer.json").is_file()
        torch.testing.assert_close(qwen2_pure.load_model(out)(ids), want, atol=1e-4, rtol=0)


def test_apply_twice_and_bad_rank(base_dir):
    model = apply_lora(qwen2_pure.load_model(base_dir), r=2)
    with pytest.raises(Qwen2PureError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(Qwen2PureError, match="rank"):
        apply_lora(qwen2_pure.load_model(base_dir), r=0)


# ---- CLI: --adapter ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_model(demo_tokenizer_dir, tmp_path_factory):
    """A tiny checkpoint with the real tokenizer (as in test_cli.py), and a strong adapter for it."""
    import shutil
    d = tmp_path_factory.mktemp("lora_cli_model")
    make_hf_checkpoint(d, heads=2, kv_heads=1, head_dim=16, layers=1, tied=True, intermediate=64, vocab=151936,
                       seed=0, max_pos=256)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_tokenizer_dir / name, d / name)
    (d / "generation_config.json").write_text(json.dumps({"max_new_tokens": 6}))
    adir = d.parent / (d.name + "_adapter")
    model = apply_lora(qwen2_pure.load_model(d), targets="all", r=4, alpha=8)
    _randomize([m.lora_B.weight for m in lora_modules(model).values()], std=2.0)
    save_adapter(model, adir)
    return d, adir


def test_cli_generate_with_adapter(capsys, cli_model):
    from qwen2_pure.cli import main
    d, adir = cli_model
    model = qwen2_pure.load_model(d, adapter=adir)
    tok = qwen2_pure.load_tokenizer(d)
    [new] = qwen2_pure.generate(model, [tok.encode("Hello")], max_new_tokens=6, stop_token_ids=tok.stop_token_ids)
    want = tok.decode(new, skip_special_tokens=True)
    [new_base] = qwen2_pure.generate(qwen2_pure.load_model(d), [tok.encode("Hello")], max_new_tokens=6,
                                     stop_token_ids=tok.stop_token_ids)
    assert new != new_base  # the adapter changes what is generated
    capsys.readouterr()
    assert main(["generate", "--model", str(d), "--adapter", str(adir), "--prompt", "Hello"]) == 0
    assert capsys.readouterr().out == want + "\n"  # generate ends its output with one newline
    assert main(["generate", "--model", str(d), "--adapter", str(d / "nope"), "--prompt", "Hello"]) == 2
    assert "adapter folder not found" in capsys.readouterr().err


def test_cli_chat_with_adapter(monkeypatch, cli_model):
    from qwen2_pure import cli
    d, adir = cli_model
    seen = {}

    class FakeSession:
        def __init__(self, model, tok, **kw):
            seen["model"] = model

        def run(self):
            return 0

    monkeypatch.setattr(cli, "ChatSession", FakeSession)
    assert cli.main(["chat", "--model", str(d), "--adapter", str(adir)]) == 0
    assert len(lora_modules(seen["model"])) == len(ALL_TARGETS)
