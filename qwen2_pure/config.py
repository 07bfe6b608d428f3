"""`Qwen2Config`: the fields of an official `config.json`, and the values derived from them.

The field names are the `config.json` keys, so a config is `Qwen2Config.from_dict(json.load(f))`.
Newer files (transformers >= 4.56 / 5.x) spell a few keys differently — `dtype` for `torch_dtype`,
`rope_parameters` for `rope_theta` + `rope_scaling`, an explicit `layer_types` list — and both spellings
are accepted. Nothing is ever inferred from a model's name. One class serves dense `qwen2` and mixture-of-experts
`qwen2_moe` files; `is_moe_layer(i)` says which MLP layer i has.

A key we do not know, or a value we cannot honour (an unknown `rope_scaling` type, an activation other
than SiLU, a quantization config), is an error naming the key: silently ignoring it would run a
different model than the one the file describes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import Qwen2PureError, read_json_object

# Keys that describe the file, the training run or the HF runtime, not the computation.
_INERT_KEYS = {
    "_name_or_path", "architectures", "transformers_version", "initializer_range", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "use_return_dict", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "pruned_heads",
    "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "_from_model_config", "keys_to_ignore_at_inference",
    # generation fields that old transformers versions wrote into config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
    # MoE training-only: the load-balancing loss weight and whether forward returns router logits
    "router_aux_loss_coef", "output_router_logits",
}
_MODEL_TYPES = ("qwen2", "qwen2_moe")
# Qwen2-MoE sizes that must be written out: transformers would fill them with Qwen1.5-MoE-A2.7B's values
_MOE_REQUIRED = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
_MOE_FIELDS = _MOE_REQUIRED + ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "qkv_bias")
_ROPE_TYPES = ("default", "linear", "yarn")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # transformers' default; every official Qwen2 file says 1e6
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: Optional[int] = None
    max_window_layers: int = 28
    layer_types: Optional[tuple] = None
    attention_dropout: float = 0.0
    torch_dtype: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    model_type: str = "qwen2"
    # Qwen2-MoE (model_type qwen2_moe; num_experts 0 = dense). A qwen2_moe file must give the four sizes;
    # the other defaults are transformers' Qwen2MoeConfig's.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False  # False for Qwen2-57B-A14B: the top-k weights are used as they are, sum < 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    qkv_bias: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # inert keys, kept for round trips

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Qwen2Config":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise Qwen2PureError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(_MODEL_TYPES)})")
        if d.pop("use_mrope", False):  # Qwen2.5 base files carry "use_mrope": false; true is Qwen2-VL's M-RoPE
            raise Qwen2PureError(f"{source}: use_mrope=true (multimodal rotary embedding, Qwen2-VL) is not supported")
        if "quantization_config" in d:
            method = (d["quantization_config"] or {}).get("quant_method", "?")
            raise Qwen2PureError(
                f"{source}: quantized checkpoints ({method}) are not supported; use the unquantized "
                "checkpoint or its GGUF file")
        # newer spellings
        if "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params:
                d["rope_theta"] = rope_params.pop("rope_theta")
            if rope_params.get("rope_type", "default") != "default" or len(rope_params) > 1:
                d["rope_scaling"] = rope_params
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(k for k in d if k not in names and k not in _INERT_KEYS)
        if unknown:
            raise Qwen2PureError(f"{source}: unknown or unsupported config keys: {', '.join(unknown)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        if model_type == "qwen2_moe":
            absent = [k for k in _MOE_REQUIRED if k not in kwargs]
            if absent:
                raise Qwen2PureError(f"{source}: a qwen2_moe config needs {', '.join(absent)} "
                                     "(transformers would fill in Qwen1.5-MoE-A2.7B's values; write them out)")
        if kwargs.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
            # left out or null: multi-head attention, one KV head per query head (transformers reads null so,
            # llama.cpp a missing head_count_kv); never the 0.5B's 2 that the dataclass default would give
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "mlp_only_layers" in kwargs and kwargs["mlp_only_layers"] is None:
            kwargs["mlp_only_layers"] = ()  # transformers reads null as []
        for key in ("layer_types", "mlp_only_layers"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        cfg = cls(**kwargs, extra={k: v for k, v in d.items() if k in _INERT_KEYS})
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2Config":
        return cls.from_dict(read_json_object(path), source=str(path))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["layer_types"] = list(self.layer_types) if self.layer_types else None
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        if self.model_type == "qwen2":  # a dense file keeps its keys; transformers' Qwen2Config knows no MoE fields
            for f in dataclasses.fields(self):
                if f.name in _MOE_FIELDS:
                    del d[f.name]
        d = {**self.extra, **{k: v for k, v in d.items() if v is not None or k in ("sliding_window",)}}
        d.setdefault("architectures", ["Qwen2MoeForCausalLM" if self.model_type == "qwen2_moe" else "Qwen2ForCausalLM"])
        return d

    def validate(self, source: str = "config.json") -> None:
        def bad(key, why):
            raise Qwen2PureError(f"{source}: {key}={getattr(self, key)!r} {why}")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"is not divisible by num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            bad("hidden_act", "is not supported (Qwen2 uses 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in _ROPE_TYPES:
                bad("rope_scaling", f"has type {kind!r}, which is not supported (supported: {', '.join(_ROPE_TYPES)})")
            factor = self.rope_scaling.get("factor")
            if kind != "default" and (not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0):
                bad("rope_scaling", f"needs a positive 'factor' for type {kind!r}")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPES:
            bad("torch_dtype", f"is not one of {', '.join(_DTYPES)}")
        if self.attention_dropout not in (0, 0.0):
            bad("attention_dropout", "must be 0 (dropout in attention is not implemented)")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", "must be > 0")
        if self.use_sliding_window and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            bad("sliding_window", "must be a positive integer when use_sliding_window is true")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                bad("layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            odd = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if odd:
                bad("layer_types", f"contains unknown types {sorted(odd)}")
        self._validate_moe(bad)

    def _validate_moe(self, bad) -> None:
        if self.model_type == "qwen2":
            # transformers' Qwen2ForCausalLM ignores these keys; honouring them would run another model
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key in _MOE_FIELDS:
                if getattr(self, key) != defaults[key]:
                    bad(key, "is a Qwen2-MoE setting; a model_type 'qwen2' file must not set it "
                             "(use model_type 'qwen2_moe')")
            return
        if not isinstance(self.qkv_bias, bool):
            bad("qkv_bias", "must be true or false")
        if not isinstance(self.norm_topk_prob, bool):
            bad("norm_topk_prob", "must be true or false")
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 0:
            bad("num_experts", "must be an integer >= 0 (0 = every layer dense)")
        if not isinstance(self.mlp_only_layers, tuple):
            bad("mlp_only_layers", "must be a list of layer indices")
        if self.num_experts == 0:
            return
        for key in ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                    "decoder_sparse_step"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, "must be a positive integer")
        if self.num_experts_per_tok > self.num_experts:
            bad("num_experts_per_tok", f"exceeds num_experts={self.num_experts} (each token picks that many experts)")
        odd = [i for i in self.mlp_only_layers
               if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_hidden_layers]
        if odd:
            bad("mlp_only_layers", f"has entries {odd} that are not layer indices 0..{self.num_hidden_layers - 1}")

    # ---- derived values --------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (the GQA group size): 7 for Qwen2-0.5B and 7B, 6 for 1.5B, 8 for 72B."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def window(self) -> Optional[int]:
        """The sliding window, or None: transformers drops it unless `use_sliding_window` is true."""
        return self.sliding_window if self.use_sliding_window else None

    def layer_window(self, i: int) -> Optional[int]:
        """Sliding window of layer i (None = full attention).

        transformers 4.57 semantics: layers i >= max_window_layers slide, the first `max_window_layers`
        see everything; an explicit `layer_types` list (newer files) wins. Inert in official checkpoints.
        """
        if self.window is None:
            return None
        if self.layer_types is not None:
            return self.window if self.layer_types[i] == "sliding_attention" else None
        if self.model_type == "qwen2_moe":  # transformers 5.x Qwen2MoeConfig: even layers below max_window_layers
            return self.window if i % 2 == 0 and i < self.max_window_layers else None
        return self.window if i >= self.max_window_layers else None

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's MLP is the sparse mixture of experts (else the dense SwiGLU of `intermediate_size`).

        transformers' rule: not listed in `mlp_only_layers`, experts configured, and every
        `decoder_sparse_step`-th layer counting from 1. Every layer of Qwen2-57B-A14B is MoE.
        """
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [int(x) for x in (e if isinstance(e, (list, tuple)) else [e])]


def _id_list(value, where: str, key: str) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in items):
        raise Qwen2PureError(f"{where}: {key}={value!r} must be a token id or a list of token ids")
    return tuple(int(x) for x in items)


@dataclass(frozen=True)
class GenerationConfig:
    """generation_config.json, read once: the ids that end or pad a generation, and the sampling defaults.

    The one place where "which tokens stop" and "what sampling means by default" are decided; generation,
    the command line and the server read them from here (transformers' `GenerationConfig` plays this part).

    - `eos_token_id`: the ids that end a generation, the file's `eos_token_id` (an int or a list; official
      Qwen2.5-Instruct: [151645, 151643]), else config.json's.
    - `pad_token_id`: the file's, else config.json's, else the first eos id (what left padding writes; no
      position ever reads it).
    - `sampling`: the file read as transformers' `generate()` reads it (`SamplingParams.from_generation_config`):
      do_sample false means greedy; absent keys take transformers' defaults.
    - `max_new_tokens`: the file's, or None.
    - `raw`: the file's dict, for writing it back.
    Errors name the file and the key.
    """

    eos_token_id: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    max_new_tokens: Optional[int] = None
    sampling: Any = None  # qwen2_pure.sampling.SamplingParams
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Optional[dict], config: Optional[Qwen2Config] = None,
                  source: str = "generation_config.json") -> "GenerationConfig":
        from .sampling import SamplingParams
        d = dict(d or {})
        eos = d.get("eos_token_id")
        eos_ids = _id_list(eos, source, "eos_token_id") if eos is not None else \
            tuple(config.eos_ids if config is not None else ())
        pad = d.get("pad_token_id", config.pad_token_id if config is not None else None)
        if isinstance(pad, (list, tuple)):  # some files write a list; the first one pads
            pad = pad[0] if pad else None
        if pad is None:
            pad = eos_ids[0] if eos_ids else None
        bos = d.get("bos_token_id", config.bos_token_id if config is not None else None)
        max_new = d.get("max_new_tokens")
        if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
            raise Qwen2PureError(f"{source}: max_new_tokens={max_new!r} must be an integer >= 1")
        try:
            sampling = SamplingParams.from_generation_config({k: v for k, v in d.items() if k != "max_new_tokens"})
        except Qwen2PureError as e:
            raise Qwen2PureError(f"{source}: {e}") from None
        return cls(eos_token_id=eos_ids, pad_token_id=None if pad is None else int(pad),
                   bos_token_id=None if bos is None else int(bos), max_new_tokens=max_new, sampling=sampling, raw=d)

    @classmethod
    def from_file(cls, path: str | Path, config: Optional[Qwen2Config] = None) -> "GenerationConfig":
        """The file at `path`, or the config's ids alone when there is no such file."""
        path = Path(path)
        d = read_json_object(path) if path.is_file() else {}
        return cls.from_dict(d, config, source=str(path))
