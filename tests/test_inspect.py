"""`qwen2-pure inspect` (qwen2_pure/inspect.py, qwen2_pure/presets.py): parameter, FLOP and memory accounting.

The analytic counts are checked three ways: against the sizes Qwen published (to the rounding of their last
digit), against the exact parameter counts the official safetensors indexes declare (total_size / 2 bytes),
and against the parameters of a model actually built — ours on the meta device, and transformers' own
`num_parameters()` for tiny random dense and MoE configs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwen2_pure import cli
from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.inspect import (format_preset_list, format_report, inspect_config, load_source, meta_model,
                                module_tree, plot_reports, published_checks)
from qwen2_pure.presets import (PRESETS, PROVENANCE_WIDTH, config_json, get_preset, list_presets,
                                resolve_preset_name)

B = 1e9

# Total sizes in billions, as the Qwen2 blog table and the Qwen2.5 model cards round them (Qwen2-7B: 7.62, the
# weights' own count; the blog's 7.07 is contradicted by the weights).
QWEN2_TOTALS = {"Qwen2-0.5B": "0.49", "Qwen2-1.5B": "1.54", "Qwen2-7B": "7.62", "Qwen2-72B": "72.7",
                "Qwen2-57B-A14B": "57.4"}
QWEN25_TOTALS = {"Qwen2.5-0.5B": "0.49", "Qwen2.5-1.5B": "1.54", "Qwen2.5-3B": "3.09", "Qwen2.5-7B": "7.62",
                 "Qwen2.5-14B": "14.7", "Qwen2.5-32B": "32.8", "Qwen2.5-72B": "72.7"}
# Non-embedding sizes as Qwen publishes them: the Qwen2 blog table and the Qwen2.5 model cards.
NON_EMBEDDING = {"Qwen2-0.5B": "0.35", "Qwen2-1.5B": "1.31", "Qwen2-72B": "70.21", "Qwen2-57B-A14B": "56.32",
                 "Qwen2.5-0.5B": "0.36", "Qwen2.5-1.5B": "1.31", "Qwen2.5-3B": "2.77", "Qwen2.5-7B": "6.53"}
# metadata.total_size / 2 of the official bf16 safetensors indexes (public copies; see presets.py).
EXACT = {"Qwen1.5-7B": 7_721_324_544, "Qwen2.5-3B": 3_085_938_688, "Qwen2.5-7B": 7_615_616_512,
         "Qwen2.5-14B": 14_770_033_664, "Qwen2.5-32B": 32_763_876_352, "Qwen2.5-72B": 72_706_203_648}


def within_last_digit(count: int, published: str) -> bool:
    """Equal up to the rounding or truncation of the published figure's last digit (Qwen uses both)."""
    decimals = len(published.split(".")[1]) if "." in published else 0
    return abs(count / B - float(published)) < 10 ** -decimals


@pytest.fixture(scope="module")
def reports():
    return {name: inspect_config(name) for name in PRESETS}


# ---- published sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(QWEN2_TOTALS))
def test_qwen2_published_totals(reports, name):
    for variant in (name, name + "-Instruct"):
        r = reports[variant]
        assert within_last_digit(r["total_params"], QWEN2_TOTALS[name]), (variant, r["total_params"])
        # the figures are rounded, so the count must also round to them
        assert round(r["total_params"] / B, len(QWEN2_TOTALS[name].split(".")[1])) == float(QWEN2_TOTALS[name])


def test_qwen2_moe_active_and_non_embedding(reports):
    r = reports["Qwen2-57B-A14B"]
    assert round(r["active_params"] / B, 1) == 14.2
    # active = everything but the 56 routed experts per layer a token does not use
    a = r["architecture"]
    expert = 3 * a["hidden_size"] * a["moe_intermediate_size"]
    idle = a["layers"] * (a["num_experts"] - a["num_experts_per_tok"]) * expert
    assert r["active_params"] == r["total_params"] - idle
    assert r["active_non_embedding_params"] == r["active_params"] - r["embedding_params"]
    assert r["mlp_detail"]["router"] == 28 * 3584 * 64
    assert r["mlp_detail"]["shared_expert_gate"] == 28 * 3584
    assert r["mlp_detail"]["shared_expert"] == 28 * 3 * 3584 * 20480
    assert r["mlp_detail"]["experts"] == 28 * 64 * expert


@pytest.mark.parametrize("name", list(QWEN25_TOTALS))
def test_qwen25_published_totals(reports, name):
    for variant in (name, name + "-Instruct"):
        assert within_last_digit(reports[variant]["total_params"], QWEN25_TOTALS[name]), variant


@pytest.mark.parametrize("name", list(NON_EMBEDDING))
def test_published_non_embedding(reports, name):
    assert within_last_digit(reports[name]["non_embedding_params"], NON_EMBEDDING[name])


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_totals_of_the_safetensors_indexes(reports, name):
    assert reports[name]["total_params"] == EXACT[name]


def test_dense_models_have_active_equal_total(reports):
    for name, r in reports.items():
        if r["model_type"] == "qwen2":
            assert r["active_params"] == r["total_params"], name


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_agrees_with_its_published_figures(reports, name):
    r = reports[name]
    assert r["published"], f"{name} has no _published figures"
    assert r["published"]["checks"] and all(c["ok"] for c in r["published"]["checks"].values()), \
        r["published"]["checks"]


def test_published_check_flags_a_wrong_figure():
    r = {"total_params": 32_763_876_352, "non_embedding_params": 31_206_740_992, "active_params": 32_763_876_352}
    checks = published_checks({"total": "32.5B", "non_embedding": "31.0B"}, r)  # the 32B card's figures
    assert not checks["total"]["ok"] and not checks["non_embedding"]["ok"]
    assert published_checks({"total": "32.8B"}, r)["total"]["ok"]


def test_report_top_level_keys_are_integers(reports):
    for r in reports.values():
        for key in ("total_params", "non_embedding_params", "active_params"):
            assert isinstance(r[key], int) and not isinstance(r[key], bool)
        json.dumps(r)  # serializable as it is


# ---- analytic counts vs a built model ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_counts_equal_the_meta_model(reports, name):
    r = reports[name]
    check = r["model_check"]
    assert check["built"], check["note"]
    assert check["matches"], check["note"]
    assert check["total"] == r["total_params"]  # sum(p.numel() for p in model.parameters())


def test_meta_model_is_on_the_meta_device():
    model = meta_model(get_preset("Qwen2-72B"), source="Qwen2-72B")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == EXACT["Qwen2.5-72B"]


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_transformers_checkpoint(tmp_path, tied):
    from hf_utils import make_hf_checkpoint
    hf = make_hf_checkpoint(tmp_path, heads=6, kv_heads=2, head_dim=16, layers=3, tied=tied, intermediate=40,
                            vocab=101)
    for f in tmp_path.glob("*.safetensors"):  # inspect must read config.json only
        f.write_bytes(b"not a safetensors file")
    for src in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        r = inspect_config(src)
        assert r["kind"] in ("folder", "file")
        assert r["total_params"] == hf.num_parameters() == sum(p.numel() for p in hf.parameters())
        assert r["model_check"]["built"] and r["model_check"]["matches"], r["model_check"]["note"]
        assert r["params"]["lm_head"] == (0 if tied else 101 * 96)
        assert r["non_embedding_params"] == r["total_params"] - 101 * 96 * (1 if tied else 2)


def test_tiny_transformers_moe_config(tmp_path):
    """MoE counts against transformers' own Qwen2MoeForCausalLM, with a dense layer among the sparse ones."""
    transformers = pytest.importorskip("transformers")
    import torch
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[3], tie_word_embeddings=False)
    cfg.save_pretrained(tmp_path)  # config.json only
    with torch.device("meta"):
        hf = transformers.Qwen2MoeForCausalLM(cfg)
    r = inspect_config(tmp_path)
    assert r["total_params"] == hf.num_parameters()
    assert r["architecture"]["moe_layers"] == 1  # layer 1 only: (i+1) % 2 == 0 and 3 is in mlp_only_layers
    expert = 3 * 32 * 16
    assert r["active_params"] == r["total_params"] - 1 * (6 - 2) * expert
    assert r["mlp_detail"]["dense"] == 3 * 3 * 32 * 48
    if r["model_check"]["built"]:
        assert r["model_check"]["matches"], r["model_check"]["note"]


def test_qwen2config_input():
    from qwen2_pure.config import Qwen2Config
    cfg = Qwen2Config.from_dict(config_json(get_preset("Qwen2-1.5B")))
    assert inspect_config(cfg)["total_params"] == inspect_config("Qwen2-1.5B")["total_params"]


def _tiny_config(**changes) -> dict:
    d = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "tie_word_embeddings": True, **changes}
    return {k: v for k, v in d.items() if v is not ...}  # `...` drops a key


@pytest.mark.parametrize("changes", [dict(num_key_value_heads=...), dict(num_key_value_heads=..., max_window_layers=1,
                                     use_sliding_window=True, sliding_window=8, max_position_embeddings=...)],
                         ids=["no-kv-heads", "defaults-and-window"])
def test_inspect_reads_a_config_json_as_the_loader_does(tmp_path, changes):
    """One config interpreter: inspect and load_model read the same config.json (keys left out included) as
    the same model. The folder's weights are those of the model the loader's reading implies."""
    import torch
    import qwen2_pure
    from qwen2_pure.config import Qwen2Config
    from qwen2_pure.model import Qwen2ForCausalLM
    from qwen2_pure.safetensors_io import write_safetensors
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config(**changes)))
    state = Qwen2ForCausalLM(Qwen2Config.from_file(tmp_path / "config.json")).state_dict()
    state.pop("lm_head.weight")  # tied
    write_safetensors(tmp_path / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in state.items()],
                      iter(state.items()))
    model = qwen2_pure.load_model(tmp_path)
    r = inspect_config(tmp_path)
    assert r["architecture"]["kv_heads"] == model.config.num_key_value_heads
    assert r["architecture"]["context"] == model.config.max_position_embeddings
    assert r["architecture"]["sliding_layers"] == sum(layer.window is not None for layer in model.model.layers)
    assert r["total_params"] == sum(p.numel() for p in model.parameters())
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.out_features == r["architecture"]["kv_heads"] * r["architecture"]["head_dim"]


@pytest.mark.parametrize("kv", [None, ...], ids=["null", "missing"])
def test_num_key_value_heads_left_out_means_multi_head_attention(kv):
    from qwen2_pure.config import Qwen2Config
    d = _tiny_config(num_attention_heads=8, hidden_size=64, num_key_value_heads=kv)
    if kv is None:  # transformers' own reading of null (its class default, 32, is Qwen2-7B's head count)
        transformers = pytest.importorskip("transformers")
        assert transformers.Qwen2Config(**d).num_key_value_heads == 8
    assert Qwen2Config.from_dict(d).num_key_value_heads == 8
    assert inspect_config(d)["architecture"]["kv_heads"] == 8


# ---- FLOPs and KV cache -----------------------------------------------------------------------------------

def test_kv_bytes_formula():
    r = inspect_config("Qwen2-7B", check_model=False)
    kv = r["kv_cache"]
    assert kv["per_token"] == 2 * 28 * 4 * 128 * 2 == 57_344
    assert kv["per_token_mha"] == 2 * 28 * 28 * 128 * 2
    assert kv["at_context"] == kv["per_token"] * 131072 == 7 * 2 ** 30
    assert kv["at_context_mha"] == 49 * 2 ** 30
    assert kv["gqa_saving"] == 7
    assert inspect_config("Qwen2-0.5B", check_model=False)["kv_cache"]["per_token"] == 2 * 24 * 2 * 64 * 2
    fp32 = inspect_config("Qwen2-7B", context=1000, kv_dtype="float32", check_model=False)["kv_cache"]
    assert fp32["per_token"] == 2 * kv["per_token"] and fp32["at_context"] == fp32["per_token"] * 1000
    mha = inspect_config("Qwen1.5-7B", check_model=False)["kv_cache"]
    assert mha["per_token"] == mha["per_token_mha"] == 2 * 32 * 32 * 128 * 2 and mha["gqa_saving"] == 1


def test_weight_bytes():
    r = inspect_config("Qwen2-7B", check_model=False)
    assert r["weight_bytes"] == {"fp32": 4 * r["total_params"], "bf16": 2 * r["total_params"],
                                 "int8": r["total_params"], "int4": r["total_params"] / 2}
    assert r["weight_bytes"]["bf16"] == 15_231_233_024  # the official index's total_size


def test_flops_formula():
    r = inspect_config("Qwen2-7B", context=4096, check_model=False)
    f = r["flops"]
    # matmul weights: everything but the embedding lookup, biases and norms (the untied head is a matmul)
    N = r["total_params"] - r["params"]["embed"] - r["params"]["norms"] - 28 * (3584 + 2 * 512)
    assert f["matmul_params_per_token"] == N
    per_key = 4 * 28 * 128 * 28  # QK^T and AV, all layers
    assert f["decode_per_token"] == 2 * N + per_key * 4096
    assert f["prefill_total"] == 2 * N * 4096 + per_key * 4096 * 4097 // 2
    assert f["prefill_total_last_logits"] == f["prefill_total"] - 2 * 152064 * 3584 * 4095  # head once
    # the prefill is the sum of the decode steps at positions 1..T
    small = [inspect_config("Qwen2-0.5B", context=t, check_model=False)["flops"] for t in range(1, 9)]
    assert small[-1]["prefill_total"] == sum(s["decode_per_token"] for s in small)
    # a tied head is still a matmul
    tied = inspect_config("Qwen2-0.5B", check_model=False)
    assert tied["flops"]["matmul_params_per_token"] > tied["total_params"] - tied["params"]["embed"] - \
        tied["params"]["norms"] - 24 * (896 + 2 * 128)


def test_sliding_window_layers_keep_window_tokens():
    d = {**config_json(get_preset("Qwen2-0.5B")), "num_hidden_layers": 2, "use_sliding_window": True,
         "sliding_window": 4, "max_window_layers": 1}
    r = inspect_config(d, context=10, check_model=False)
    per_layer = 2 * 2 * 64 * 2
    assert r["kv_cache"]["at_context"] == per_layer * (10 + 4)  # layer 0 full, layer 1 keeps 4
    f, per_key = r["flops"], 4 * 14 * 64
    assert f["decode_attention"] == per_key * (10 + 4)
    assert f["prefill_total"] - 2 * f["matmul_params_per_token"] * 10 == per_key * (55 + (10 + 6 * 4))


# ---- presets -----------------------------------------------------------------------------------------------

def test_preset_names():
    names = list_presets()
    for size in ("0.5B", "1.5B", "7B", "72B", "57B-A14B"):
        assert f"Qwen2-{size}" in names and f"Qwen2-{size}-Instruct" in names
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
        assert f"Qwen2.5-{size}" in names and f"Qwen2.5-{size}-Instruct" in names
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B"):
        assert f"Qwen2.5-Coder-{size}" in names and f"Qwen2.5-Coder-{size}-Instruct" in names
    for size in ("1.5B", "7B", "72B"):
        assert f"Qwen2.5-Math-{size}" in names and f"Qwen2.5-Math-{size}-Instruct" in names
    assert "Qwen1.5-7B" in names and len(names) == 43
    for name in names:
        assert get_preset(name)["_provenance"] and get_preset(name)["_sources"]


@pytest.mark.parametrize("name", [n for n in PRESETS if "Coder" in n or "Math" in n])
def test_coder_and_math_presets(name):
    """The facts Qwen's tables and every copy agree on: vocabulary and tying by size, context and RoPE base."""
    c = config_json(get_preset(name))
    small = any(f"-{size}" in name for size in ("0.5B", "1.5B", "3B"))
    assert c["tie_word_embeddings"] is small
    assert c["vocab_size"] == (151936 if small else 152064)
    assert c["eos_token_id"] == (151645 if name.endswith("-Instruct") else 151643)
    if "Coder" in name:
        assert (c["max_position_embeddings"], c["rope_theta"]) == (32768, 1e6)
    else:
        assert (c["max_position_embeddings"], c["rope_theta"]) == (4096, 10000)


# internal shorthand that must not reach a user: bracket tags such as [R] or [PC], section signs, issue numbers
INTERNAL = re.compile(r"\[[A-Z][A-Z0-9]{0,3}\]|§|\bissues?\b|\bseed\b", re.IGNORECASE)


def _provenance_texts(preset: dict) -> list[str]:
    return [preset["_provenance"], *preset["_sources"], preset["_published"]["source"]]


@pytest.mark.parametrize("name", list(PRESETS))
def test_provenance_speaks_to_a_reader(name):
    preset = PRESETS[name]
    for text in _provenance_texts(preset):
        assert not INTERNAL.search(text), (name, INTERNAL.search(text).group(), text)
    assert len(preset["_provenance"]) <= PROVENANCE_WIDTH and "\n" not in preset["_provenance"]
    # the sources name a place a reader can go to: a web address, a paper, or a repository and its file
    assert any(re.search(r"https://|arXiv:|\w[\w.-]*/[\w.-]+", s) for s in preset["_sources"]), name


def _same_words(printed: str, text: str) -> bool:
    """`text` appears in `printed` with only the whitespace between its words changed (wrapped, never cut)."""
    return " ".join(text.split()) in " ".join(printed.split())


def test_report_prints_the_sources_whole():
    for name in PRESETS:
        out = format_report(inspect_config(name, check_model=False))
        for text in _provenance_texts(PRESETS[name]):
            assert _same_words(out, text), (name, text)
        assert not INTERNAL.search(out), (name, INTERNAL.search(out).group())


def test_preset_list_wraps_between_words():
    out = format_preset_list()
    lines = out.splitlines()
    starts = [line for line in lines if not line.startswith(" ")]
    assert [line.split()[0] for line in starts] == list(PRESETS)  # one row a preset, the name alone in its column
    assert all(len(line) <= 110 for line in lines)
    for name, preset in PRESETS.items():
        assert _same_words(out, preset["_provenance"]), name
    assert not INTERNAL.search(out)


@pytest.mark.parametrize("spelling", ["Qwen2-7B", "qwen2-7b", "Qwen/Qwen2-7B", "qwen/QWEN2-7B", " Qwen2-7B "])
def test_preset_resolution(spelling):
    assert resolve_preset_name(spelling) == "Qwen2-7B"
    assert config_json(get_preset(spelling)) == config_json(PRESETS["Qwen2-7B"])


def test_unknown_preset_suggests_close_names():
    with pytest.raises(Qwen2PureError, match="Qwen2-7B") as e:
        get_preset("Qwen2-8B")
    assert "unknown model preset" in str(e.value)
    with pytest.raises(Qwen2PureError, match="Qwen2.5-7B-Instruct"):
        get_preset("Qwen/qwen2.5-7b-instruc")
    with pytest.raises(Qwen2PureError, match="no such folder or file"):
        load_source("./missing/config.json")


def test_get_preset_returns_a_copy():
    d = get_preset("Qwen2-7B")
    d["hidden_size"] = 1
    d["architectures"].append("x")
    assert PRESETS["Qwen2-7B"]["hidden_size"] == 3584 and PRESETS["Qwen2-7B"]["architectures"] == ["Qwen2ForCausalLM"]


def test_instruct_presets_differ_only_in_non_architectural_fields():
    shape_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta", "model_type",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
    for name in PRESETS:
        if name.endswith("-Instruct"):
            base, inst = PRESETS[name[:-len("-Instruct")]], PRESETS[name]
            assert inst["eos_token_id"] == 151645 and base["eos_token_id"] == 151643
            assert inst["max_position_embeddings"] == (4096 if "-Math-" in name else 32768)
            assert all(base.get(k) == inst.get(k) for k in shape_keys), name


def test_preset_values_spot_checks():
    assert PRESETS["Qwen2-72B"]["rms_norm_eps"] == 1e-5 and PRESETS["Qwen2-72B-Instruct"]["rms_norm_eps"] == 1e-6
    assert PRESETS["Qwen2-57B-A14B"]["norm_topk_prob"] is False
    assert [PRESETS[f"Qwen2.5-{s}"]["tie_word_embeddings"] for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")] \
        == [True, True, True, False, False, False, False]
    assert PRESETS["Qwen2.5-1.5B-Instruct"]["max_window_layers"] == 21
    assert PRESETS["Qwen1.5-7B"]["num_key_value_heads"] == 32


# ---- module tree ---------------------------------------------------------------------------------------------

def test_module_tree_of_72b_costs_no_memory():
    tree = module_tree(get_preset("Qwen2-72B"), source="Qwen2-72B")
    assert tree.startswith("Qwen2ForCausalLM(")
    assert "(q_proj): Linear(in_features=8192, out_features=8192, bias=True)" in tree
    assert "(0-79): 80 x " in tree


# ---- CLI -------------------------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    code = cli.main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(capsys):
    code, out, _ = run_cli(capsys, "Qwen2-7B", "--json")
    assert code == 0
    d = json.loads(out)
    for key in ("total_params", "non_embedding_params", "active_params"):
        assert isinstance(d[key], int)
    assert d["total_params"] == 7_615_616_512


def test_cli_json_compare(capsys):
    code, out, _ = run_cli(capsys, "--compare", "Qwen1.5-7B", "Qwen2-7B", "--json")
    d = json.loads(out)
    assert code == 0 and [r["name"] for r in d["compare"]] == ["Qwen1.5-7B", "Qwen2-7B"]
    assert d["total_params"] == EXACT["Qwen1.5-7B"]


def test_cli_table(capsys):
    code, out, _ = run_cli(capsys, "qwen/qwen2-57b-a14b")
    assert code == 0
    for text in ("Qwen2-57B-A14B", "57.409 B", "14.249 B", "active per token", "KV cache (bf16)", "GQA saves 7x",
                 "matches"):
        assert text in out, text


@pytest.mark.parametrize("argv", [["--compare", "Qwen1.5-7B", "Qwen2-7B"], ["Qwen1.5-7B", "--compare", "Qwen2-7B"]])
def test_cli_compare(capsys, argv):
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    header = out.splitlines()[0]
    assert "Qwen1.5-7B" in header and "Qwen2-7B" in header
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert rows["layers"][1:3] == ["32", "28"]
    assert "KV heads" in out and "group size" in out and "KV/token (bf16)" in out


def test_cli_tree(capsys):
    code, out, _ = run_cli(capsys, "Qwen2-7B", "--tree")
    assert code == 0
    assert "Qwen2ForCausalLM(" in out
    assert "(q_proj): Linear(in_features=3584, out_features=3584, bias=True)" in out


def test_cli_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sizes.png"
    code, out, err = run_cli(capsys, "Qwen1.5-7B", "--compare", "Qwen2-7B", "--plot", str(png))
    assert code == 0 and str(png) in err and "Qwen1.5-7B" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    moe = plot_reports([inspect_config("Qwen2-57B-A14B", check_model=False)], tmp_path / "moe.png")
    assert moe.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli(capsys, "Qwen2-7B", "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "pip install matplotlib" in err


def test_cli_config_json_path(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_json(get_preset("Qwen2-1.5B"))))
    code, out, _ = run_cli(capsys, str(path), "--json", "--context", "4096")
    d = json.loads(out)
    assert code == 0 and d["total_params"] == 1_543_714_304 and d["kind"] == "file"
    assert d["kv_cache"]["context"] == 4096


@pytest.mark.parametrize("argv, message", [
    (["Qwen2-8B"], "did you mean"),
    (["--compare", "Qwen2-7B"], "compares two models"),
    (["Qwen2-7B", "--compare", "Qwen2-1.5B", "Qwen2-0.5B"], "compares two models"),
    (["Qwen2-7B", "--dtype", "fp8"], "dtype"),
    (["Qwen2-7B", "--context", "0"], "--context"),
    ([], "inspect needs a model"),
])
def test_cli_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_list(capsys):
    code, out, _ = run_cli(capsys, "--list")
    assert code == 0 and "Qwen2.5-72B-Instruct" in out and "Qwen2.5-Math-72B-Instruct" in out
    assert not INTERNAL.search(out)
    for name, preset in PRESETS.items():  # every provenance whole: no line ends in a cut word
        assert name in out and _same_words(out, preset["_provenance"]), name
