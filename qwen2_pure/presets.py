"""Built-in `config.json` files of the official Qwen2 and Qwen2.5 checkpoints (and Qwen1.5-7B), for `inspect`.

Each preset is the config.json of the official Hugging Face repository of that name, as a dict, plus two keys
of our own that no config.json has:

- `_provenance`: where the values come from, and which of them are uncertain;
- `_published`: the parameter counts the Qwen team (or the checkpoint's own safetensors index) states, with
  the source. `exact_total` is `metadata.total_size` of `model.safetensors.index.json` divided by 2 (bf16):
  the true parameter count of the published weights. Counts that the weights contradict are named in the
  source text but not listed as published.

`config_json(preset)` strips those two keys again. Only the fields that do not change the architecture
(`max_window_layers`, `sliding_window` — inert while `use_sliding_window` is false —, `transformers_version`)
are, for a few Instruct files, taken from the base file or from sibling checkpoints; `_provenance` says where.

Sources (all public copies; the HF repositories could not be read from here):
- [R]  this project's reference, shared/reference/qwen2-semantics.md §6.7 (Qwen2 values, with its own sources).
- [LG] Lightning-AI/litgpt `litgpt/config.py`, the Qwen2.5 entries (n_embd, n_layer, n_head, n_query_groups,
       intermediate_size, padded_vocab_size, norm_eps, rope_base, block_size = the base max_position_embeddings).
- [MP] citsjtu2020/LLM-Prof `sglang/Model_Config.md`: verbatim Qwen2.5-3B/7B/14B/32B (base) config.json.
- [I6] rwth-i6/i6_experiments `.../configurations/qwen2/qwen2_configs.py`: verbatim Qwen2-0.5B config.json.
- [TR] NVIDIA/TensorRT-LLM `tests/unittest/_torch/modeling/test_modeling_qwen_moe.py`: QWEN2_57B_A14B_CONFIG.
- [HF] huggingface/transformers `examples/pytorch/torchacc/qwen/Qwen1.5-7B/`: config.json and
       model.safetensors.index.json (total_size 15442649088 bytes).
- [DE] Retruth/deontic `nlp_models/qwen2/README.md`: Qwen/Qwen2-7B-Instruct's config as transformers loads it.
- [MC] the model cards (ZHUI/paddlenlp_model_readme `Qwen/<name>/index.md` mirrors them): "Number of
       Parameters" and "Non-Embedding" of every Qwen2.5 size.
- [BL] the Qwen2 release blog's size table (quoted by public summaries): 0.49B/0.35B, 1.54B/1.31B,
       7.07B/5.98B, 57.41B/56.32B, 72.71B/70.21B (total / non-embedding).
- [PC] public code copies found by content search but not attributable to one repository: test fixtures,
       logs and docs quoting the config.json or the safetensors index of the named checkpoint.
"""

from __future__ import annotations

import copy
import difflib

from .errors import Qwen2PureError

META_KEYS = ("_provenance", "_published")

_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "initializer_range": 0.02, "model_type": "qwen2", "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
}


def _dense(hidden, layers, heads, kv_heads, intermediate, vocab, tied, *, context, eps=1e-6, window=None,
           max_window_layers=None, transformers_version=None, **extra) -> dict:
    d = dict(_QWEN2, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
             num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
             tie_word_embeddings=tied, max_position_embeddings=context, rms_norm_eps=eps,
             sliding_window=window if window is not None else context,
             max_window_layers=max_window_layers if max_window_layers is not None else layers)
    if transformers_version:
        d["transformers_version"] = transformers_version
    d.update(extra)
    return dict(sorted(d.items()))


def _instruct(base: dict, provenance: str, published: dict | None = None, **changes) -> dict:
    d = {k: v for k, v in base.items() if k not in META_KEYS}
    d.update(eos_token_id=151645, **changes)
    d = dict(sorted(d.items()))
    d["_provenance"] = provenance
    if published is not None:
        d["_published"] = published
    return d


def _with(d: dict, provenance: str, published: dict | None = None) -> dict:
    d = dict(d, _provenance=provenance)
    if published is not None:
        d["_published"] = published
    return d


PRESETS: dict[str, dict] = {}

# ---- Qwen1.5-7B: the MHA predecessor, for `inspect --compare Qwen1.5-7B Qwen2-7B` --------------------------
PRESETS["Qwen1.5-7B"] = _with(
    _dense(4096, 32, 32, 32, 11008, 151936, False, context=32768, window=32768, max_window_layers=28,
           transformers_version="4.37.0"),
    "[HF] verbatim copy of Qwen/Qwen1.5-7B config.json (model_type qwen2: Qwen1.5 is the Qwen2 architecture "
    "with 32 KV heads, i.e. no GQA).",
    {"exact_total": 7721324544,
     "source": "[HF] model.safetensors.index.json total_size 15442649088 bytes (bf16) / 2"})

# ---- Qwen2 (June 2024) ------------------------------------------------------------------------------------
_Q2_BLOG = "[BL] Qwen2 blog size table"
PRESETS["Qwen2-0.5B"] = _with(
    _dense(896, 24, 14, 2, 4864, 151936, True, context=131072, transformers_version="4.40.1"),
    "[I6] verbatim copy of Qwen/Qwen2-0.5B config.json; agrees with [R] (which cites the published file at "
    "revision 91d2aff3).",
    {"total": "0.49B", "non_embedding": "0.35B", "source": _Q2_BLOG})
PRESETS["Qwen2-1.5B"] = _with(
    _dense(1536, 28, 12, 2, 8960, 151936, True, context=131072, transformers_version="4.40.1"),
    "[R] §6.7 (from HF-hosted re-uploads of Qwen/Qwen2-1.5B, transformers 4.40.1).",
    {"total": "1.54B", "non_embedding": "1.31B", "source": _Q2_BLOG})
PRESETS["Qwen2-7B"] = _with(
    _dense(3584, 28, 28, 4, 18944, 152064, False, context=131072),
    "[R] §6.7 (a public repo's Qwen2_7B dict and derivatives of Qwen/Qwen2-7B). transformers_version omitted "
    "(4.37.2 in one copy, not confirmed).",
    {"total": "7.62B", "non_embedding": "6.53B", "exact_total": 7615616512,
     "source": "[PC] the safetensors index of Qwen/Qwen2.5-7B-Instruct (identical shapes) declares total_size "
               "15231233024 bytes = 7,615,616,512 bf16 parameters; [MC] Qwen2.5-7B says 7.61B / 6.53B. The Qwen2 "
               "blog's 7.07B / 5.98B for Qwen2-7B is contradicted by the weights (7.07B is the total minus one "
               "embedding matrix)."})
PRESETS["Qwen2-72B"] = _with(
    _dense(8192, 80, 64, 8, 29568, 152064, False, context=131072, eps=1e-5),
    "[R] §6.7, from the official Qwen/Qwen2-72B config.json page at revision c03367ee (rms_norm_eps 1e-05). "
    "max_window_layers is 80 in later-revision copies (28 in that early revision); it is inert.",
    {"total": "72.71B", "non_embedding": "70.21B", "exact_total": 72706203648,
     "source": _Q2_BLOG + "; exact_total from the safetensors index of Qwen/Qwen2.5-72B-Instruct (identical "
               "shapes): total_size 145412407296 bytes [PC]"})
PRESETS["Qwen2-57B-A14B"] = _with(
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
    "[TR] QWEN2_57B_A14B_CONFIG, agreeing with [R] §6.7. intermediate_size 18944 is unused (every layer is "
    "MoE); mlp_only_layers and qkv_bias are absent (transformers defaults: [] and true).",
    {"total": "57.41B", "non_embedding": "56.32B", "active": "14.2B",
     "source": _Q2_BLOG + " (total, non-embedding); 'A14B' in the name; 14.2B active is the figure issue 6 "
               "quotes (no Qwen source found for the decimal)"})

_Q2_INSTRUCT = ("Instruct: the base file with eos_token_id 151645 and max_position_embeddings 32768, as [R] "
                "§6.7 states for every Qwen2 Instruct model. ")
PRESETS["Qwen2-0.5B-Instruct"] = _instruct(
    PRESETS["Qwen2-0.5B"], _Q2_INSTRUCT + "sliding_window is set to 32768 as in the Qwen2.5 small Instruct "
    "files; [R] says 32768 or 131072 depending on revision (inert).",
    PRESETS["Qwen2-0.5B"]["_published"], max_position_embeddings=32768, sliding_window=32768)
PRESETS["Qwen2-1.5B-Instruct"] = _instruct(
    PRESETS["Qwen2-1.5B"], _Q2_INSTRUCT + "sliding_window 32768: uncertain, 32768 or 131072 by revision (inert).",
    PRESETS["Qwen2-1.5B"]["_published"], max_position_embeddings=32768, sliding_window=32768)
PRESETS["Qwen2-7B-Instruct"] = _instruct(
    PRESETS["Qwen2-7B"], _Q2_INSTRUCT + "[DE] confirms max_position_embeddings 32768, max_window_layers 28, "
    "rms_norm_eps 1e-06, eos 151645; its sliding_window is shown as null (transformers drops it), so the base "
    "value 131072 is kept: uncertain (inert).",
    PRESETS["Qwen2-7B"]["_published"], max_position_embeddings=32768)
PRESETS["Qwen2-72B-Instruct"] = _instruct(
    PRESETS["Qwen2-72B"], _Q2_INSTRUCT + "rms_norm_eps 1e-06 per [R] (public copies of Qwen2-72B-Instruct); "
    "a [PC] copy shows max_window_layers 80, sliding_window 131072.",
    PRESETS["Qwen2-72B"]["_published"], max_position_embeddings=32768, rms_norm_eps=1e-06)
PRESETS["Qwen2-57B-A14B-Instruct"] = _instruct(
    PRESETS["Qwen2-57B-A14B"], _Q2_INSTRUCT + "The 32K context is also what xorbitsai/inference lists for "
    "Qwen/Qwen2-57B-A14B-Instruct. sliding_window kept at the base 131072: uncertain (inert).",
    PRESETS["Qwen2-57B-A14B"]["_published"], max_position_embeddings=32768)

# ---- Qwen2.5 (September 2024) -----------------------------------------------------------------------------
_Q25_DIMS = "Dimensions, vocab, norm eps and base context agree with [LG]. "
PRESETS["Qwen2.5-0.5B"] = _with(
    _dense(896, 24, 14, 2, 4864, 151936, True, context=32768, transformers_version="4.40.1", use_mrope=False),
    _Q25_DIMS + "Verbatim [PC] copy of Qwen/Qwen2.5-0.5B config.json (with use_mrope false).",
    {"total": "0.49B", "non_embedding": "0.36B",
     "source": "[MC]; the 0.5B-Instruct model.safetensors is 988,097,824 bytes including its JSON header [PC], "
               "consistent with 494,032,768 bf16 parameters and a 32 KB header"})
PRESETS["Qwen2.5-1.5B"] = _with(
    _dense(1536, 28, 12, 2, 8960, 151936, True, context=131072),
    _Q25_DIMS + "max_position_embeddings 131072 from [LG] block_size. max_window_layers / sliding_window are "
    "not confirmed by a copy (inert); the official file may also carry use_mrope false and "
    "transformers_version 4.40.1 like its 0.5B/3B/7B siblings.",
    {"total": "1.54B", "non_embedding": "1.31B", "source": "[MC]"})
PRESETS["Qwen2.5-3B"] = _with(
    _dense(2048, 36, 16, 2, 11008, 151936, True, context=32768, transformers_version="4.40.1", use_mrope=False),
    _Q25_DIMS + "Verbatim copy in [MP].",
    {"total": "3.09B", "non_embedding": "2.77B", "exact_total": 3085938688,
     "source": "[MC]; exact_total: safetensors index of Qwen/Qwen2.5-3B-Instruct, total_size 6171877376 bytes [PC]"})
PRESETS["Qwen2.5-7B"] = _with(
    _dense(3584, 28, 28, 4, 18944, 152064, False, context=131072, transformers_version="4.40.1", use_mrope=False),
    _Q25_DIMS + "Verbatim copy in [MP].",
    {"total": "7.61B", "non_embedding": "6.53B", "exact_total": 7615616512,
     "source": "[MC] (7.61B: the card truncates 7.6156B); exact_total: safetensors index of "
               "Qwen/Qwen2.5-7B-Instruct, total_size 15231233024 bytes [PC]"})
PRESETS["Qwen2.5-14B"] = _with(
    _dense(5120, 48, 40, 8, 13824, 152064, False, context=131072, eps=1e-5, transformers_version="4.43.1"),
    _Q25_DIMS + "Verbatim copy in [MP].",
    {"total": "14.7B", "exact_total": 14770033664,
     "source": "[MC] total; exact_total: safetensors total_size 29540067328 bytes, 579 tensors [PC]. The card's "
               "13.1B non-embedding is contradicted by the weights (13.21B)."})
PRESETS["Qwen2.5-32B"] = _with(
    _dense(5120, 64, 40, 8, 27648, 152064, False, context=131072, eps=1e-5, transformers_version="4.43.1"),
    _Q25_DIMS + "Verbatim copy in [MP].",
    {"total": "32.8B", "exact_total": 32763876352,
     "source": "safetensors index of a Qwen/Qwen2.5-32B-Instruct snapshot, total_size 65527752704 bytes [PC]. "
               "The card's 32.5B total / 31.0B non-embedding are contradicted by the weights (32.76B / 31.21B)."})
PRESETS["Qwen2.5-72B"] = _with(
    _dense(8192, 80, 64, 8, 29568, 152064, False, context=131072, eps=1e-5),
    _Q25_DIMS + "No verbatim copy found: max_window_layers 80 / sliding_window 131072 / transformers_version "
    "are not confirmed (inert, transformers_version omitted).",
    {"total": "72.7B", "exact_total": 72706203648,
     "source": "[MC] total; exact_total: safetensors index of Qwen/Qwen2.5-72B-Instruct, total_size "
               "145412407296 bytes [PC]. The card's 70.0B non-embedding is contradicted by the weights (70.21B)."})

_Q25_INSTRUCT = "Instruct: eos_token_id 151645, max_position_embeddings 32768, transformers_version 4.43.1. "
PRESETS["Qwen2.5-0.5B-Instruct"] = _instruct(
    PRESETS["Qwen2.5-0.5B"], _Q25_INSTRUCT + "[PC] verbatim copies (a duplicated Qwen/Qwen2.5-0.5B-Instruct "
    "config.json, a training log): max_window_layers 21, sliding_window 32768, no use_mrope.",
    PRESETS["Qwen2.5-0.5B"]["_published"], max_window_layers=21, transformers_version="4.43.1", use_mrope=None)
PRESETS["Qwen2.5-1.5B-Instruct"] = _instruct(
    PRESETS["Qwen2.5-1.5B"], _Q25_INSTRUCT + "[PC] verbatim copies (a C++ test fixture mirroring the pinned "
    "checkpoint, a transformers log of Qwen/Qwen2.5-1.5B-Instruct/config.json): max_window_layers 21, "
    "sliding_window 32768.",
    PRESETS["Qwen2.5-1.5B"]["_published"], max_position_embeddings=32768, sliding_window=32768,
    max_window_layers=21, transformers_version="4.43.1")
PRESETS["Qwen2.5-3B-Instruct"] = _instruct(
    PRESETS["Qwen2.5-3B"], _Q25_INSTRUCT + "[PC] verbatim copy (a test's 'Qwen/Qwen2.5-3B-Instruct published "
    "config.json fields'): max_window_layers 70, sliding_window 32768, no use_mrope.",
    PRESETS["Qwen2.5-3B"]["_published"], max_window_layers=70, transformers_version="4.43.1", use_mrope=None)
PRESETS["Qwen2.5-7B-Instruct"] = _instruct(
    PRESETS["Qwen2.5-7B"], _Q25_INSTRUCT + "rms_norm_eps 1e-06 and the dimensions are those of the base file; "
    "max_window_layers 28 / sliding_window 131072 kept from the base: not confirmed by a copy (inert).",
    PRESETS["Qwen2.5-7B"]["_published"], max_position_embeddings=32768, transformers_version="4.43.1",
    use_mrope=None)
PRESETS["Qwen2.5-14B-Instruct"] = _instruct(
    PRESETS["Qwen2.5-14B"], _Q25_INSTRUCT + "rms_norm_eps 1e-06 and max_window_layers 70 by analogy with the "
    "32B/72B-Instruct copies: not seen in a copy of this file (uncertain; eps changes numerics, not shapes).",
    PRESETS["Qwen2.5-14B"]["_published"], max_position_embeddings=32768, rms_norm_eps=1e-06,
    max_window_layers=70)
PRESETS["Qwen2.5-32B-Instruct"] = _instruct(
    PRESETS["Qwen2.5-32B"], _Q25_INSTRUCT + "[PC] verbatim copy quoted in a GitHub issue: rms_norm_eps 1e-06, "
    "max_window_layers 70, sliding_window 131072.",
    PRESETS["Qwen2.5-32B"]["_published"], max_position_embeddings=32768, rms_norm_eps=1e-06,
    max_window_layers=70)
PRESETS["Qwen2.5-72B-Instruct"] = _instruct(
    PRESETS["Qwen2.5-72B"], _Q25_INSTRUCT + "[PC] copies (a quantization guide's config, the AWQ repo's "
    "config): rms_norm_eps 1e-06, max_window_layers 70, sliding_window 131072.",
    PRESETS["Qwen2.5-72B"]["_published"], max_position_embeddings=32768, rms_norm_eps=1e-06,
    max_window_layers=70, transformers_version="4.43.1")

for _d in PRESETS.values():  # `use_mrope=None` above means: this file has no use_mrope key
    if "use_mrope" in _d and _d["use_mrope"] is None:
        del _d["use_mrope"]
del _d


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


def config_json(d: dict) -> dict:
    """`d` without the keys presets add (`_provenance`, `_published`): the config.json itself."""
    return {k: v for k, v in d.items() if k not in META_KEYS}
