"""Built-in `config.json` files of the official Qwen2, Qwen2.5, Qwen2.5-Coder and Qwen2.5-Math checkpoints (and
Qwen1.5-7B), for `inspect`.

Each preset is the config.json of the official Hugging Face repository of that name
(https://huggingface.co/Qwen/<name>), as a dict, plus three keys of our own that no config.json has:

- `_provenance`: one line, at most 80 characters, saying where the values come from (`inspect --list`
  shows it);
- `_sources`: the sources in full (repository and file, web page or paper) and the values that no source
  confirms;
- `_published`: the parameter counts the Qwen team (or the checkpoint's own safetensors index) states, with
  the source. `exact_total` is `metadata.total_size` of `model.safetensors.index.json` divided by 2 (bf16):
  the true parameter count of the published weights. Counts that the weights contradict are named in the
  source text but not listed as published.

The official files themselves could not be read from here: every value comes from a public copy of the
file (a verbatim copy, a conversion that keeps its fields, or a fine-tune saved from it), from litgpt's
table of the same models, or from Qwen's own tables, and `_sources` names which. The fields that shape the
model (sizes, heads, vocabulary, tying) are confirmed for every preset. Where only a re-saved copy exists
(transformers writes `sliding_window` as null and its own `transformers_version` when it saves), the fields
that do not change the model (`max_window_layers`, `sliding_window`, inert while `use_sliding_window` is
false, and `transformers_version`) are taken from the sibling file or left out, and `_sources` says so.
`config_json(preset)` strips the three keys again.
"""

from __future__ import annotations

import copy
import difflib

from .errors import Qwen2PureError

META_KEYS = ("_provenance", "_sources", "_published")
PROVENANCE_WIDTH = 80  # `_provenance` is one line of `inspect --list`

_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "initializer_range": 0.02, "model_type": "qwen2", "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
}


def _dense(hidden, layers, heads, kv_heads, intermediate, vocab, tied, *, context, eps=1e-6, window=None,
           max_window_layers=None, transformers_version=None, **extra) -> dict:
    """A dense Qwen2 config.json; an `extra` value of None leaves that key out of the file."""
    d = dict(_QWEN2, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
             num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
             tie_word_embeddings=tied, max_position_embeddings=context, rms_norm_eps=eps,
             sliding_window=window if window is not None else context,
             max_window_layers=max_window_layers if max_window_layers is not None else layers,
             transformers_version=transformers_version, **extra)
    return dict(sorted((k, v) for k, v in d.items() if v is not None))


def _instruct(base: dict, **changes) -> dict:
    """The config.json of the Instruct sibling of preset `base`: eos_token_id 151645 and `changes`."""
    d = dict(config_json(base), eos_token_id=151645, **changes)
    return dict(sorted((k, v) for k, v in d.items() if v is not None))


def config_json(d: dict) -> dict:
    """`d` without the keys presets add (`_provenance`, `_sources`, `_published`): the config.json itself."""
    return {k: v for k, v in d.items() if k not in META_KEYS}


def _preset(config: dict, provenance: str, sources: list[str], published: dict) -> dict:
    if len(provenance) > PROVENANCE_WIDTH or "\n" in provenance:
        raise ValueError(f"_provenance must be one line of at most {PROVENANCE_WIDTH} characters: {provenance!r}")
    return {**config, "_provenance": provenance, "_sources": list(sources), "_published": dict(published)}


def _add_instruct(base_name: str, changes: dict, provenance: str, sources: list[str]) -> None:
    """PRESETS[base_name + "-Instruct"]: the base file with eos_token_id 151645 and `changes` (a value of None
    removes the key), and the base model's published parameter counts (the weights have the same shapes)."""
    base = PRESETS[base_name]
    PRESETS[base_name + "-Instruct"] = _preset(_instruct(base, **changes), provenance, sources, base["_published"])


def _hub(name: str) -> str:
    return f"https://huggingface.co/Qwen/{name}/blob/main/config.json"


def _litgpt(name: str, instruct_eps: bool = False) -> str:
    """litgpt's table entry for `name`; with `instruct_eps`, say that its norm eps is the base model's."""
    fields = "hidden size, layers, query and KV heads, intermediate size, padded vocabulary, RoPE base and " \
        "context (block_size) agree" + ("" if instruct_eps else ", and so does the norm eps")
    note = ("; its norm eps, 1e-05, is the base model's (litgpt has one entry for base and Instruct), so the "
            "Instruct file's 1e-06 comes from the copy above" if instruct_eps else "")
    return ("Lightning-AI/litgpt, litgpt/config.py (https://github.com/Lightning-AI/litgpt/blob/main/litgpt/"
            f"config.py), entry {name}: {fields}{note}.")
_QWEN2_REPORT = ("The Qwen2 Technical Report (arXiv:2407.10671), Table 1, gives the same hidden size, layers, "
                 "heads, intermediate size and embedding tying.")
_QWEN2_BLOG = "the size table of the Qwen2 release blog (https://qwenlm.github.io/blog/qwen2/)"


def _card(name: str) -> str:
    return (f"the model card of Qwen/{name} (https://huggingface.co/Qwen/{name}), mirrored in "
            f"ZHUI/paddlenlp_model_readme, Qwen/{name}/index.md")


PRESETS: dict[str, dict] = {}

# ---- Qwen1.5-7B: the MHA predecessor, for `inspect --compare Qwen1.5-7B Qwen2-7B` --------------------------
PRESETS["Qwen1.5-7B"] = _preset(
    _dense(4096, 32, 32, 32, 11008, 151936, False, context=32768, window=32768, max_window_layers=28,
           transformers_version="4.37.0"),
    "verbatim copy of its config.json in the huggingface/transformers repository",
    [f"config.json of Qwen/Qwen1.5-7B ({_hub('Qwen1.5-7B')}), copied verbatim in huggingface/transformers, "
     "examples/pytorch/torchacc/qwen/Qwen1.5-7B/config.json. model_type is qwen2: Qwen1.5 is the Qwen2 "
     "architecture with 32 KV heads, i.e. no grouped-query attention."],
    {"exact_total": 7721324544,
     "source": "model.safetensors.index.json in the same folder: total_size 15442649088 bytes (bf16) / 2"})

# ---- Qwen2 (June 2024) ------------------------------------------------------------------------------------
_Q2_SIZES = _QWEN2_BLOG + " (total / non-embedding)"
PRESETS["Qwen2-0.5B"] = _preset(
    _dense(896, 24, 14, 2, 4864, 151936, True, context=131072, transformers_version="4.40.1"),
    "verbatim copy of its config.json in rwth-i6/i6_experiments",
    [f"config.json of Qwen/Qwen2-0.5B ({_hub('Qwen2-0.5B')}), copied verbatim in rwth-i6/i6_experiments, "
     "users/juanola/experiments/e25_11_13_ctc/configurations/qwen2/qwen2_configs.py. It agrees with "
     "chgk13/Qwen2-0.5B-openvino on the Hub, a conversion of Qwen/Qwen2-0.5B that keeps its config.",
     _QWEN2_REPORT],
    {"total": "0.49B", "non_embedding": "0.35B", "source": _Q2_SIZES})
PRESETS["Qwen2-1.5B"] = _preset(
    _dense(1536, 28, 12, 2, 8960, 151936, True, context=131072, transformers_version="4.40.1"),
    "re-uploads of the checkpoint on the Hub; Qwen2 Technical Report, Table 1",
    ["config.json of the Hub re-uploads rombodawg/Qwen2-1.5b-Reuploaded (transformers 4.40.1) and "
     "Egoli/Qwen2-1.5b-identity (_name_or_path Qwen/Qwen2-1.5B); the official file is " + _hub("Qwen2-1.5B") + ".",
     _QWEN2_REPORT],
    {"total": "1.54B", "non_embedding": "1.31B", "source": _Q2_SIZES})
PRESETS["Qwen2-7B"] = _preset(
    _dense(3584, 28, 28, 4, 18944, 152064, False, context=131072),
    "copies of its config.json in public code; Qwen2 Technical Report, Table 1",
    [f"config.json of Qwen/Qwen2-7B ({_hub('Qwen2-7B')}) as a Qwen2_7B dict in public code and in models "
     "fine-tuned from it on the Hub (e.g. heegyu/0713-qwen2-infini-qarv). transformers_version is left out: "
     "one copy says 4.37.2, no second copy confirms it.",
     _QWEN2_REPORT],
    {"total": "7.62B", "non_embedding": "6.53B", "exact_total": 7615616512,
     "source": "The safetensors index of Qwen/Qwen2.5-7B-Instruct (the same tensor shapes) declares total_size "
               "15231233024 bytes = 7,615,616,512 bf16 parameters (a copy in public code); the Qwen2.5-7B model "
               "card says 7.61B / 6.53B. The Qwen2 blog's 7.07B / 5.98B for Qwen2-7B is contradicted by the "
               "weights (7.07B is the total minus one embedding matrix)."})
PRESETS["Qwen2-72B"] = _preset(
    _dense(8192, 80, 64, 8, 29568, 152064, False, context=131072, eps=1e-5),
    "its config.json page on the Hugging Face Hub at revision c03367ee",
    ["https://huggingface.co/Qwen/Qwen2-72B/blob/c03367ee/config.json (rms_norm_eps 1e-05). max_window_layers "
     "is 28 in that revision and 80 in copies of later ones; it is inert. transformers_version left out.",
     _QWEN2_REPORT],
    {"total": "72.71B", "non_embedding": "70.21B", "exact_total": 72706203648,
     "source": _Q2_SIZES + "; exact_total from the safetensors index of Qwen/Qwen2.5-72B-Instruct (the same "
               "tensor shapes), total_size 145412407296 bytes, as copied in public code"})
PRESETS["Qwen2-57B-A14B"] = _preset(
    dict(sorted({
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
        "max_window_layers": 28, "model_type": "qwen2_moe", "moe_intermediate_size": 2560, "norm_topk_prob": False,
        "num_attention_heads": 28, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}.items())),
    "copy of its config.json in NVIDIA/TensorRT-LLM's tests",
    [f"config.json of Qwen/Qwen2-57B-A14B ({_hub('Qwen2-57B-A14B')}) as QWEN2_57B_A14B_CONFIG in "
     "NVIDIA/TensorRT-LLM, tests/unittest/_torch/modeling/test_modeling_qwen_moe.py. intermediate_size 18944 "
     "is unused (every layer is MoE); mlp_only_layers and qkv_bias are absent (transformers defaults: [] and "
     "true).",
     _QWEN2_REPORT + " It counts the shared expert as 8 shared experts of 2,560 (one of 20,480 here)."],
    {"total": "57.41B", "non_embedding": "56.32B", "active": "14B",
     "source": _Q2_SIZES + "; active: the 'A14B' in the name (our count, total minus the routed experts a "
               "token does not use, is 14.25B)"})

_Q2_INSTRUCT = ("The Instruct file is the base file with eos_token_id 151645 and max_position_embeddings 32768, "
                "as the copies below show.")
_add_instruct(
    "Qwen2-0.5B", dict(max_position_embeddings=32768, sliding_window=32768),
    "copies of its config.json on the Hugging Face Hub",
    [f"config.json of Qwen/Qwen2-0.5B-Instruct ({_hub('Qwen2-0.5B-Instruct')}) in copies on the Hub: "
     "harry85/Qwen2-0.5B-Instruct and PrunaAI/Qwen-Qwen2-0.5B-Instruct-HQQ-1bit-smashed (max_window_layers 24, "
     "sliding_window 32768). transformers_version is the base file's 4.40.1: the copies were saved again "
     "with later versions.", _Q2_INSTRUCT])
_add_instruct(
    "Qwen2-1.5B", dict(max_position_embeddings=32768, sliding_window=32768),
    "the base file with the Instruct changes; sliding_window not confirmed",
    [f"The official file is {_hub('Qwen2-1.5B-Instruct')}; no copy of it was found. " + _Q2_INSTRUCT.replace(
        "as the copies below show", "as copies of the other Qwen2 Instruct files show") +
     " sliding_window 32768 is unconfirmed: 32768 or 131072 depending on the revision (inert)."])
_add_instruct(
    "Qwen2-7B", dict(max_position_embeddings=32768),
    "its config as transformers prints it, in Retruth/deontic",
    [f"config.json of Qwen/Qwen2-7B-Instruct ({_hub('Qwen2-7B-Instruct')}) as transformers prints it in "
     "Retruth/deontic, nlp_models/qwen2/README.md: max_position_embeddings 32768, max_window_layers 28, "
     "rms_norm_eps 1e-06, eos_token_id 151645. It shows sliding_window as null (transformers drops it), so "
     "the base file's 131072 is kept, unconfirmed (inert)."])
_add_instruct(
    "Qwen2-72B", dict(max_position_embeddings=32768, rms_norm_eps=1e-06),
    "copies of its config.json in public code",
    [f"config.json of Qwen/Qwen2-72B-Instruct ({_hub('Qwen2-72B-Instruct')}) in copies found in public code "
     "(their repositories were not recorded): rms_norm_eps 1e-06, max_window_layers 80, sliding_window "
     "131072. " + _Q2_INSTRUCT.replace("as the copies below show", "as these copies show")])
_add_instruct(
    "Qwen2-57B-A14B", dict(max_position_embeddings=32768),
    "the base file with the Instruct changes; sliding_window not confirmed",
    [f"The official file is {_hub('Qwen2-57B-A14B-Instruct')}; no copy of it was found. " + _Q2_INSTRUCT.replace(
        "as the copies below show", "as copies of the other Qwen2 Instruct files show") +
     " xorbitsai/inference also lists a 32K context for Qwen/Qwen2-57B-A14B-Instruct. sliding_window is kept "
     "at the base file's 131072, unconfirmed (inert)."])

# ---- Qwen2.5 (September 2024) -----------------------------------------------------------------------------
_MP = "citsjtu2020/LLM-Prof, sglang/Model_Config.md"
PRESETS["Qwen2.5-0.5B"] = _preset(
    _dense(896, 24, 14, 2, 4864, 151936, True, context=32768, transformers_version="4.40.1", use_mrope=False),
    "verbatim copy of its config.json in public code; litgpt agrees",
    [f"config.json of Qwen/Qwen2.5-0.5B ({_hub('Qwen2.5-0.5B')}), copied verbatim under the heading "
     "'Qwen/Qwen2.5-0.5B, model config' in a Markdown file in public code (its repository was not recorded). "
     "osllmai-community/Qwen2.5-0.5B on the Hub, saved again from it, agrees.",
     _litgpt("Qwen2.5-0.5B")],
    {"total": "0.49B", "non_embedding": "0.36B",
     "source": _card("Qwen2.5-0.5B") + "; the model.safetensors of Qwen/Qwen2.5-0.5B-Instruct is 988,097,824 "
               "bytes with its JSON header (a copy in public code), consistent with 494,032,768 bf16 parameters"})
PRESETS["Qwen2.5-1.5B"] = _preset(
    _dense(1536, 28, 12, 2, 8960, 151936, True, context=131072),
    "litgpt's table of the model; no copy of the file itself",
    [_litgpt("Qwen2.5-1.5B") + " max_position_embeddings 131072 is litgpt's block_size.",
     f"No copy of {_hub('Qwen2.5-1.5B')} was found: max_window_layers and sliding_window are unconfirmed "
     "(inert), and the file may also carry use_mrope false and transformers_version 4.40.1 like its "
     "0.5B/3B/7B siblings."],
    {"total": "1.54B", "non_embedding": "1.31B", "source": _card("Qwen2.5-1.5B")})
PRESETS["Qwen2.5-3B"] = _preset(
    _dense(2048, 36, 16, 2, 11008, 151936, True, context=32768, transformers_version="4.40.1", use_mrope=False),
    "verbatim copy of its config.json in citsjtu2020/LLM-Prof",
    [f"config.json of Qwen/Qwen2.5-3B ({_hub('Qwen2.5-3B')}), copied verbatim in {_MP}.",
     _litgpt("Qwen2.5-3B")],
    {"total": "3.09B", "non_embedding": "2.77B", "exact_total": 3085938688,
     "source": _card("Qwen2.5-3B") + "; exact_total: the safetensors index of Qwen/Qwen2.5-3B-Instruct, "
               "total_size 6171877376 bytes, as copied in public code"})
PRESETS["Qwen2.5-7B"] = _preset(
    _dense(3584, 28, 28, 4, 18944, 152064, False, context=131072, transformers_version="4.40.1", use_mrope=False),
    "verbatim copy of its config.json in citsjtu2020/LLM-Prof",
    [f"config.json of Qwen/Qwen2.5-7B ({_hub('Qwen2.5-7B')}), copied verbatim in {_MP}.",
     _litgpt("Qwen2.5-7B")],
    {"total": "7.61B", "non_embedding": "6.53B", "exact_total": 7615616512,
     "source": _card("Qwen2.5-7B") + " (7.61B: the card truncates 7.6156B); exact_total: the safetensors "
               "index of Qwen/Qwen2.5-7B-Instruct, total_size 15231233024 bytes, as copied in public code"})
PRESETS["Qwen2.5-14B"] = _preset(
    _dense(5120, 48, 40, 8, 13824, 152064, False, context=131072, eps=1e-5, transformers_version="4.43.1"),
    "verbatim copy of its config.json in citsjtu2020/LLM-Prof",
    [f"config.json of Qwen/Qwen2.5-14B ({_hub('Qwen2.5-14B')}), copied verbatim in {_MP}.",
     _litgpt("Qwen2.5-14B")],
    {"total": "14.7B", "exact_total": 14770033664,
     "source": _card("Qwen2.5-14B") + " (total); exact_total: safetensors total_size 29540067328 bytes, 579 "
               "tensors, as copied in public code. The card's 13.1B non-embedding is contradicted by the weights "
               "(13.21B)."})
PRESETS["Qwen2.5-32B"] = _preset(
    _dense(5120, 64, 40, 8, 27648, 152064, False, context=131072, eps=1e-5, transformers_version="4.43.1"),
    "verbatim copy of its config.json in citsjtu2020/LLM-Prof",
    [f"config.json of Qwen/Qwen2.5-32B ({_hub('Qwen2.5-32B')}), copied verbatim in {_MP}.",
     _litgpt("Qwen2.5-32B")],
    {"total": "32.8B", "exact_total": 32763876352,
     "source": "the safetensors index of a Qwen/Qwen2.5-32B-Instruct snapshot, total_size 65527752704 bytes, as "
               "copied in public code. " + _card("Qwen2.5-32B")[0].upper() + _card("Qwen2.5-32B")[1:] +
               " says 32.5B total / 31.0B non-embedding, contradicted by the weights (32.76B / 31.21B)."})
PRESETS["Qwen2.5-72B"] = _preset(
    _dense(8192, 80, 64, 8, 29568, 152064, False, context=131072, eps=1e-5),
    "litgpt's table of the model; no copy of the file itself",
    [_litgpt("Qwen2.5-72B"),
     f"No copy of {_hub('Qwen2.5-72B')} was found: max_window_layers 80 and sliding_window 131072 are "
     "unconfirmed (inert); transformers_version is left out."],
    {"total": "72.7B", "exact_total": 72706203648,
     "source": _card("Qwen2.5-72B") + " (total); exact_total: the safetensors index of Qwen/Qwen2.5-72B-Instruct, "
               "total_size 145412407296 bytes, as copied in public code. The card's 70.0B non-embedding is "
               "contradicted by the weights (70.21B)."})

_Q25_INSTRUCT = ("The Instruct files differ from the base files in eos_token_id 151645, max_position_embeddings "
                 "32768 and transformers_version 4.43.1.")
_add_instruct(
    "Qwen2.5-0.5B", dict(max_window_layers=21, transformers_version="4.43.1", use_mrope=None),
    "verbatim copies of its config.json in public code",
    [f"config.json of Qwen/Qwen2.5-0.5B-Instruct ({_hub('Qwen2.5-0.5B-Instruct')}) in verbatim copies in public "
     "code, a duplicated config.json and a training log (their repositories were not recorded): "
     "max_window_layers 21, sliding_window 32768, no use_mrope.", _Q25_INSTRUCT])
_add_instruct(
    "Qwen2.5-1.5B",
    dict(max_position_embeddings=32768, sliding_window=32768, max_window_layers=21, transformers_version="4.43.1"),
    "verbatim copies of its config.json in public code",
    [f"config.json of Qwen/Qwen2.5-1.5B-Instruct ({_hub('Qwen2.5-1.5B-Instruct')}) in verbatim copies in public "
     "code, a C++ test fixture of the pinned checkpoint and a transformers log of the file (their repositories "
     "were not recorded): max_window_layers 21, sliding_window 32768.", _Q25_INSTRUCT])
_add_instruct(
    "Qwen2.5-3B", dict(max_window_layers=70, transformers_version="4.43.1", use_mrope=None),
    "verbatim copy of its config.json in a test in public code",
    [f"config.json of Qwen/Qwen2.5-3B-Instruct ({_hub('Qwen2.5-3B-Instruct')}), quoted as its 'published "
     "config.json fields' by a test in public code (its repository was not recorded): max_window_layers 70, "
     "sliding_window 32768, no use_mrope.", _Q25_INSTRUCT])
_add_instruct(
    "Qwen2.5-7B", dict(max_position_embeddings=32768, transformers_version="4.43.1", use_mrope=None),
    "the base file with the Instruct changes; inert fields not confirmed",
    [f"The official file is {_hub('Qwen2.5-7B-Instruct')}; no verbatim copy was found. rms_norm_eps 1e-06 and "
     "the dimensions are those of the base file; max_window_layers 28 and sliding_window 131072 are kept from "
     "it, unconfirmed (inert).", _Q25_INSTRUCT])
_add_instruct(
    "Qwen2.5-14B", dict(max_position_embeddings=32768, rms_norm_eps=1e-06, max_window_layers=70),
    "verbatim duplicate of its repository on the Hugging Face Hub",
    [f"config.json of Qwen/Qwen2.5-14B-Instruct ({_hub('Qwen2.5-14B-Instruct')}), duplicated verbatim in "
     "jebish7/Qwen2.5-14B-Instruct on the Hub ('Duplicate from Qwen/Qwen2.5-14B-Instruct'): rms_norm_eps "
     "1e-06, max_window_layers 70, sliding_window 131072, transformers_version 4.43.1.", _Q25_INSTRUCT])
_add_instruct(
    "Qwen2.5-32B", dict(max_position_embeddings=32768, rms_norm_eps=1e-06, max_window_layers=70),
    "verbatim copy of its config.json quoted in a bug report on GitHub",
    [f"config.json of Qwen/Qwen2.5-32B-Instruct ({_hub('Qwen2.5-32B-Instruct')}), quoted verbatim in a bug "
     "report on GitHub (its repository was not recorded): rms_norm_eps 1e-06, max_window_layers 70, "
     "sliding_window 131072.", _Q25_INSTRUCT])
_add_instruct(
    "Qwen2.5-72B",
    dict(max_position_embeddings=32768, rms_norm_eps=1e-06, max_window_layers=70, transformers_version="4.43.1"),
    "copies of its config.json in a guide and in the AWQ repository",
    [f"config.json of Qwen/Qwen2.5-72B-Instruct ({_hub('Qwen2.5-72B-Instruct')}) in copies in public code, a "
     "quantization guide's config and the config of the AWQ repository (not recorded further): rms_norm_eps "
     "1e-06, max_window_layers 70, sliding_window 131072.", _Q25_INSTRUCT])

# ---- Qwen2.5-Coder (September / November 2024) ------------------------------------------------------------
_CODER_TABLE = ("The size table of the Qwen2.5-Coder family blog (https://qwenlm.github.io/blog/qwen2.5-coder-"
                "family/), quoted in jazzwang/snippet, md/genai/llm/qwen.md, gives {} layers, {} query / {} KV heads "
                "and {} embeddings.")
_CODER_LONG = (" Its context column says 128K: that is the YaRN-extended context of the model card; config.json "
               "itself says 32768.")
_CODER_SIZES = "the size table of the Qwen2.5-Coder family blog (total / non-embedding)"


def _mlx_copy(name: str, repo: str, fields: str) -> str:
    """The source sentence for a config.json kept by an mlx-community conversion of Qwen/`name`."""
    return (f"config.json of Qwen/{name} ({_hub(name)}) as kept by mlx-community/{repo} on the Hugging Face Hub, "
            f"an mlx-lm conversion (mlx-lm keeps every field of config.json and adds only its quantization keys): "
            f"{fields}.")



_SAVED_AGAIN = ("Saving again wrote sliding_window as null and its own transformers_version: sliding_window {} "
                "is unconfirmed (inert) and transformers_version is left out.")


def _resaved(name: str, where: str, fields: str, window) -> str:
    """The source sentence for a config.json of Qwen/`name` that transformers saved again in `where`."""
    return f"config.json of Qwen/{name} ({_hub(name)}) as saved again in {where} on the Hub: {fields}. " + \
        _SAVED_AGAIN.format(window)


PRESETS["Qwen2.5-Coder-0.5B"] = _preset(
    _dense(896, 24, 14, 2, 4864, 151936, True, context=32768),
    "litgpt's table, Qwen's size table and a model built on it on the Hub",
    [_litgpt("Qwen2.5-Coder-0.5B"), _CODER_TABLE.format(24, 14, 2, "tied"),
     f"The official file is {_hub('Qwen2.5-Coder-0.5B')}. faisalmumtaz/codecompass-embed on the Hub, built on "
     "Qwen/Qwen2.5-Coder-0.5B, keeps max_window_layers 24, max_position_embeddings 32768 and rms_norm_eps "
     "1e-06. " + _SAVED_AGAIN.format(32768) + " use_mrope is left out (unknown)."],
    {"total": "0.49B", "non_embedding": "0.36B",
     "source": _CODER_SIZES + "; the Hub page of mlx-community/Qwen2.5-Coder-0.5B-bf16 counts 494M parameters"})
_add_instruct(
    "Qwen2.5-Coder-0.5B", dict(max_window_layers=21),
    "its config.json as saved again in unsloth's 4-bit copy on the Hub",
    [_resaved("Qwen2.5-Coder-0.5B-Instruct", "unsloth/Qwen2.5-Coder-0.5B-Instruct-bnb-4bit", "eos_token_id 151645, "
              "max_window_layers 21, max_position_embeddings 32768, rms_norm_eps 1e-06, tied embeddings "
              "(GoidaAlignment/GOIDA-0.5B, fine-tuned from it, agrees)", 32768),
     _litgpt("Qwen2.5-Coder-0.5B-Instruct")])
PRESETS["Qwen2.5-Coder-1.5B"] = _preset(
    _dense(1536, 28, 12, 2, 8960, 151936, True, context=32768, max_window_layers=21),
    "litgpt's table, Qwen's size table and a model saved from it on the Hub",
    [_litgpt("Qwen2.5-Coder-1.5B"), _CODER_TABLE.format(28, 12, 2, "tied"),
     f"The official file is {_hub('Qwen2.5-Coder-1.5B')}. tmickleydoyle/Question-To-Code on the Hub, "
     "fine-tuned from unsloth/qwen2.5-coder-1.5b-bnb-4bit (a copy of Qwen/Qwen2.5-Coder-1.5B), keeps "
     "max_window_layers 21, max_position_embeddings 32768 and rms_norm_eps 1e-06. " + _SAVED_AGAIN.format(32768)
     + " use_mrope is left out (unknown).",
     "The model card as first published (" + _card("Qwen2.5-Coder-1.5B") + ") says 'Full 131,072 tokens'; "
     "litgpt, the family blog (32K) and the copies say 32768, which is used."],
    {"total": "1.54B", "non_embedding": "1.31B",
     "source": _CODER_SIZES + " and " + _card("Qwen2.5-Coder-1.5B")})
_add_instruct(
    "Qwen2.5-Coder-1.5B", {},
    "a modified copy on the Hub and litgpt's table; eos_token_id not confirmed",
    [f"The official file is {_hub('Qwen2.5-Coder-1.5B-Instruct')}; no verbatim copy was found. "
     "ibrahimkettaneh/Qwen2.5-Coder-1.5B-Instruct-abliterated-AWQ on the Hub, a modified Qwen/Qwen2.5-Coder-"
     "1.5B-Instruct, keeps max_window_layers 21, max_position_embeddings 32768, rms_norm_eps 1e-06 and tied "
     "embeddings. It shows eos_token_id 151643; 151645 (<|im_end|>), the value of every other Instruct file, "
     "is used, unconfirmed. " + _SAVED_AGAIN.format(32768),
     _litgpt("Qwen2.5-Coder-1.5B-Instruct")])
PRESETS["Qwen2.5-Coder-3B"] = _preset(
    _dense(2048, 36, 16, 2, 11008, 151936, True, context=32768, transformers_version="4.40.1", use_mrope=False),
    "its config.json in mlx-community's conversions on the Hub",
    [_mlx_copy("Qwen2.5-Coder-3B", "Qwen2.5-Coder-3B-4bit (and -8bit)", "max_window_layers 36, sliding_window "
               "32768, rms_norm_eps 1e-06, use_mrope false, transformers_version 4.40.1"),
     _litgpt("Qwen2.5-Coder-3B"), _CODER_TABLE.format(36, 16, 2, "tied")],
    {"total": "3.09B", "non_embedding": "2.77B",
     "source": _CODER_SIZES + "; the Hub page of mlx-community/Qwen2.5-Coder-3B-Instruct-bf16 counts 3.09B "
               "parameters"})
_add_instruct(
    "Qwen2.5-Coder-3B", dict(max_window_layers=70, transformers_version=None, use_mrope=None),
    "its config.json as saved again in onnx-community's conversion",
    [_resaved("Qwen2.5-Coder-3B-Instruct", "onnx-community/Qwen2.5-Coder-3B-Instruct (and LemOneLabs/Qwen2.5-"
              "Coder-3B-Instruct, the same file)", "eos_token_id 151645, max_window_layers 70, "
              "max_position_embeddings 32768, rms_norm_eps 1e-06, no use_mrope", 32768),
     _litgpt("Qwen2.5-Coder-3B-Instruct")])
PRESETS["Qwen2.5-Coder-7B"] = _preset(
    _dense(3584, 28, 28, 4, 18944, 152064, False, context=32768, window=131072),
    "litgpt's table, Qwen's size table and a model saved from it on the Hub",
    [_litgpt("Qwen2.5-Coder-7B"), _CODER_TABLE.format(28, 28, 4, "untied") + _CODER_LONG,
     f"The official file is {_hub('Qwen2.5-Coder-7B')}. ashikshaffi08/fim-coder-v2 on the Hub "
     "(_name_or_path Qwen/Qwen2.5-Coder-7B) keeps max_position_embeddings 32768, max_window_layers 28 and "
     "rms_norm_eps 1e-06. " + _SAVED_AGAIN.format("131072 (the Instruct file's)") +
     " use_mrope is left out (unknown)."],
    {"total": "7.61B", "non_embedding": "6.53B",
     "source": _CODER_SIZES + " and " + _card("Qwen2.5-Coder-7B") + " (7.61B: 7.6156B truncated)"})
_add_instruct(
    "Qwen2.5-Coder-7B", dict(transformers_version="4.44.0"),
    "its config.json commits on the Hub and copies saved from it",
    ["The commit 'update README & config.json' of Qwen/Qwen2.5-Coder-7B-Instruct on the Hub "
     "(https://huggingface.co/Qwen/Qwen2.5-Coder-7B-Instruct/commit/d619c0c9d73c20b76470c9bd29f5c435c2f6669d) "
     "shows max_position_embeddings 32768, max_window_layers 28, transformers_version 4.44.0 and vocab_size "
     "152064 (it removed a YaRN rope_scaling block). The later commit 014013f ('Update config.json', "
     "9 November 2024) was not seen.",
     "CodeDPO/qwen2.5-7b-coder-instruct-deepcoder-100steps on the Hub, saved from a download of the current "
     "file, shows eos_token_id 151645, sliding_window 131072 and rms_norm_eps 1e-06. "
     "XGenerationLab/XiYanSQL-QwenCoder-7B-2502, saved from an earlier download, shows eos_token_id 151643: "
     "the November commit probably changed it.",
     _litgpt("Qwen2.5-Coder-7B-Instruct")])
PRESETS["Qwen2.5-Coder-14B"] = _preset(
    _dense(5120, 48, 40, 8, 13824, 152064, False, context=32768, eps=1e-5, window=131072,
           transformers_version="4.43.1"),
    "its config.json in mlx-community's 4-bit conversion on the Hub",
    [_mlx_copy("Qwen2.5-Coder-14B", "Qwen2.5-Coder-14B-4bit", "max_position_embeddings 32768, max_window_layers "
               "48, rms_norm_eps 1e-05, sliding_window 131072, transformers_version 4.43.1"),
     "unsloth/Qwen2.5-Coder-14B on the Hub, saved again from it, agrees.",
     _litgpt("Qwen2.5-Coder-14B"), _CODER_TABLE.format(48, 40, 8, "untied") + _CODER_LONG],
    {"total": "14.7B",
     "source": _CODER_SIZES + " (total). Its 13.1B non-embedding is contradicted by the weights (13.21B)."})
_add_instruct(
    "Qwen2.5-Coder-14B", dict(rms_norm_eps=1e-06, transformers_version=None),
    "its config.json as saved again in RedHatAI's FP8 conversion",
    [_resaved("Qwen2.5-Coder-14B-Instruct", "RedHatAI/Qwen2.5-Coder-14B-Instruct-FP8-dynamic", "eos_token_id "
              "151645, max_position_embeddings 32768, max_window_layers 48 (a model saved from unsloth's 4-bit "
              "copy shows 70, inert either way)", "131072 (the base file's)"),
     "MeowFET/Qwen2.5-PP-14B-Instruct on the Hub, fine-tuned from it, shows rms_norm_eps 1e-06.",
     _litgpt("Qwen2.5-Coder-14B-Instruct", instruct_eps=True)])
PRESETS["Qwen2.5-Coder-32B"] = _preset(
    _dense(5120, 64, 40, 8, 27648, 152064, False, context=32768, eps=1e-5, window=131072,
           transformers_version="4.43.1"),
    "its config.json in mlx-community's 4-bit conversion on the Hub",
    [_mlx_copy("Qwen2.5-Coder-32B", "Qwen2.5-Coder-32B-4bit (its branch refs/pr/1)", "max_position_embeddings "
               "32768, max_window_layers 64, rms_norm_eps 1e-05, sliding_window 131072, transformers_version 4.43.1"),
     _litgpt("Qwen2.5-Coder-32B"), _CODER_TABLE.format(64, 40, 8, "untied") + _CODER_LONG],
    {"total": "32.8B",
     "source": "the Hub page of mlx-community/Qwen2.5-Coder-32B-bf16, a bf16 conversion, counts 32.8B parameters. "
               "The family blog's 32.5B total / 31.0B non-embedding are contradicted by the weights "
               "(32.76B / 31.21B)."})
_add_instruct(
    "Qwen2.5-Coder-32B", dict(rms_norm_eps=1e-06),
    "verbatim copy of its config.json in a commit of a Hub repository",
    [f"config.json of Qwen/Qwen2.5-Coder-32B-Instruct ({_hub('Qwen2.5-Coder-32B-Instruct')}), copied verbatim "
     "by the commit 'Add config.json from Qwen/Qwen2.5-Coder-32B-Instruct' of ai-team-20/qwen3-coder-480b-3 on "
     "the Hub (https://huggingface.co/ai-team-20/qwen3-coder-480b-3/commit/6e6b0cb69a58fc511a4dbfe5ac908e26dbd2"
     "7580): eos_token_id 151645, rms_norm_eps 1e-06, max_window_layers 64, sliding_window 131072, "
     "transformers_version 4.43.1.", _litgpt("Qwen2.5-Coder-32B-Instruct", instruct_eps=True)])

# ---- Qwen2.5-Math (September 2024): 4K context, rope_theta 10000 ------------------------------------------
_MATH_SIZES = ("The Qwen2.5-Math model cards state no parameter count. Qwen2.5-Math is trained from the Qwen2.5 "
               "base models (Qwen2.5-Math Technical Report, arXiv:2409.12122) and this file has the tensor shapes "
               "of Qwen2.5-{0}, whose figures are those of " + _card("Qwen2.5-{0}"))
PRESETS["Qwen2.5-Math-1.5B"] = _preset(
    _dense(1536, 28, 12, 2, 8960, 151936, True, context=4096, max_window_layers=21, rope_theta=10000,
           transformers_version="4.44.0", use_mrope=False),
    "its config.json in mlx-community's bf16 conversion on the Hub",
    [_mlx_copy("Qwen2.5-Math-1.5B", "Qwen2.5-Math-1.5B-bf16 (https://huggingface.co/mlx-community/Qwen2.5-Math-"
               "1.5B-bf16/blob/c4eab3af176f2821f3e0f8c16aa73f9bd1e6043c/config.json)", "max_position_embeddings "
               "4096, rope_theta 10000, sliding_window 4096, max_window_layers 21, use_mrope false, "
               "transformers_version 4.44.0") + " The model card of waleko/Qwen2.5-Math-1.5B-RoPE-300k lists the same "
     "base values.", _litgpt("Qwen2.5-Math-1.5B")],
    {"total": "1.54B", "non_embedding": "1.31B", "source": _MATH_SIZES.format("1.5B")})
_add_instruct(
    "Qwen2.5-Math-1.5B", dict(rope_theta=10000.0, transformers_version=None, use_mrope=None),
    "models fine-tuned from it on the Hub; litgpt agrees",
    [f"The official file is {_hub('Qwen2.5-Math-1.5B-Instruct')}. Models fine-tuned from it on the Hub, "
     "plaguss/Qwen2.5-Math-1.5B-Instruct-PRM-0.1 and Geralt-Targaryen/QwQ-Math-1.5B-Persona, keep "
     "eos_token_id 151645, max_position_embeddings 4096, rope_theta 10000.0, max_window_layers 21, "
     "sliding_window 4096 and tied embeddings, and have no use_mrope. transformers_version is left out.",
     _litgpt("Qwen2.5-Math-1.5B-Instruct")])
PRESETS["Qwen2.5-Math-7B"] = _preset(
    _dense(3584, 28, 28, 4, 18944, 152064, False, context=4096, rope_theta=10000, use_mrope=False),
    "copies saved from it on the Hub; litgpt agrees",
    [f"config.json of Qwen/Qwen2.5-Math-7B ({_hub('Qwen2.5-Math-7B')}) as saved again in unsloth/Qwen2.5-Math-7B,"
     " TIGER-Lab/Qwen2.5-Math-7B-CFT and Kadins/Qwen-2.5-7B-Simple-RL on the Hub: max_position_embeddings "
     "4096, rope_theta 10000, max_window_layers 28, rms_norm_eps 1e-06, use_mrope false; the last keeps "
     "sliding_window 4096. transformers_version is left out (each copy shows the version that saved it).",
     _litgpt("Qwen2.5-Math-7B")],
    {"total": "7.61B", "non_embedding": "6.53B",
     "source": _MATH_SIZES.format("7B") + " (its model card names Qwen/Qwen2.5-7B as base_model)"})
_add_instruct(
    "Qwen2.5-Math-7B", dict(rope_theta=10000.0, use_mrope=None),
    "copies saved from it on the Hub; litgpt agrees",
    [_resaved("Qwen2.5-Math-7B-Instruct", "BitStarWalkin/SuperCorrect-7B and PRIME-RL/EurusPRM-Stage1",
              "eos_token_id 151645, max_position_embeddings 4096, rope_theta 10000.0, max_window_layers 28, "
              "rms_norm_eps 1e-06, no use_mrope", 4096), _litgpt("Qwen2.5-Math-7B-Instruct")])
PRESETS["Qwen2.5-Math-72B"] = _preset(
    _dense(8192, 80, 64, 8, 29568, 152064, False, context=4096, eps=1e-5, rope_theta=10000),
    "litgpt's table of the model; no copy of the file itself",
    [_litgpt("Qwen2.5-Math-72B") + " rms_norm_eps 1e-05 is litgpt's only (the Qwen2.5-72B base file has "
     "1e-05 too).",
     f"No copy of {_hub('Qwen2.5-Math-72B')} was found: max_window_layers 80 and sliding_window 4096 (inert) "
     "and the token ids 151643 are unconfirmed; transformers_version and use_mrope are left out."],
    {"total": "72.7B",
     "source": _MATH_SIZES.format("72B") + "; the Hub page of neuralmagic-ent/Qwen2.5-Math-72B-Instruct-FP8-"
               "dynamic also counts 72.7B parameters"})
_add_instruct(
    "Qwen2.5-Math-72B", dict(rms_norm_eps=1e-06, max_window_layers=70, rope_theta=10000.0),
    "its config.json as saved again in unsloth's copy on the Hub",
    [_resaved("Qwen2.5-Math-72B-Instruct", "unsloth/Qwen2.5-Math-72B-Instruct", "eos_token_id 151645, "
              "max_position_embeddings 4096, rope_theta 10000.0, max_window_layers 70, rms_norm_eps 1e-06", 4096),
     _litgpt("Qwen2.5-Math-72B-Instruct", instruct_eps=True)])


# ---- lookup -----------------------------------------------------------------------------------------------

def _key(name: str) -> str:
    name = name.strip()
    if name.lower().startswith("qwen/"):
        name = name[5:]
    return name.lower()


_BY_KEY = {_key(n): n for n in PRESETS}


def list_presets() -> list[str]:
    """The preset names, as the official repositories spell them (without the `Qwen/` organisation)."""
    return list(PRESETS)


def is_preset(name: str) -> bool:
    return _key(name) in _BY_KEY


def resolve_preset_name(name: str) -> str:
    """The canonical name of preset `name` (any case, optional `Qwen/`), or a Qwen2PureError with suggestions."""
    key = _key(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    close = difflib.get_close_matches(key, list(_BY_KEY), n=6, cutoff=0.75)
    close += [k for k in _BY_KEY if k.startswith(key) and k not in close] if key else []
    hint = (f" (did you mean {', '.join(_BY_KEY[k] for k in close[:6])}?)" if close
            else f" (presets: {', '.join(PRESETS)})")
    raise Qwen2PureError(f"unknown model preset {name!r}{hint}; `qwen2-pure inspect --list` lists the presets, "
                         "and a checkpoint folder or a config.json path works too")


def get_preset(name: str) -> dict:
    """A copy of the config.json dict of preset `name`, with its `_provenance` and `_published` keys."""
    return copy.deepcopy(PRESETS[resolve_preset_name(name)])
