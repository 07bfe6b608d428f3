"""Parameter, FLOP and memory accounting for a Qwen2 / Qwen2-MoE config, without loading any weights.

`inspect_config(cfg)` turns a config.json dict (or a `Qwen2Config`) into a report: parameters per part,
FLOPs per token, weight bytes per dtype and KV-cache bytes. The config is read by `Qwen2Config`, exactly as
the loader reads it (its defaults, its checks, its errors), so inspect counts the model `load_model` builds.
The counts are computed from it (analytically) and cross-checked, part by part, against our
`Qwen2ForCausalLM` built on the meta device (shapes only, no memory).

Definitions (the report's keys):
- parts: `embed` (embed_tokens, V·H), `attention` (q/k/v/o weights and the q/k/v biases), `mlp` (SwiGLU
  gate/up/down; for MoE layers the router, every expert, the shared expert and its gate), `norms` (two
  RMSNorms per layer and the final one), `lm_head` (V·H, or 0 when tied to embed_tokens: one tensor).
- `total_params`: the sum of the parts: what `sum(p.numel() for p in model.parameters())` gives.
- `non_embedding_params`: total − embed − lm_head (the untied head is an embedding-sized matrix too). This
  is the definition behind Qwen's published "non-embedding" figures (Qwen2-72B: 72.71B − 2·1.25B = 70.21B).
- `active_params`: parameters a token touches: total minus the routed experts it does not use, i.e.
  non-expert + top-k experts + the shared expert (equal to total for dense models). Includes the embedding
  table and head, as the "A14B" in Qwen2-57B-A14B does (`active_non_embedding_params` excludes them).
- FLOPs per token (multiply-add = 2 FLOPs): 2·N + attention, where N is the number of weights used in
  matmuls by one token (attention q/k/v/o, the active MLP/expert/router weights, and the head V·H even when
  tied: the lookup of embed_tokens is free, the head is a matmul). Attention adds QKᵀ and AV: 4·H_q·D
  FLOPs per visible key per layer. Decode at position T: the new token is the T-th and sees T keys, so
  2·N + 4·L·H_q·D·T. Prefill of T tokens with a causal mask (only visible keys counted, as a kernel that
  skips masked blocks does): 2·N·T + 4·L·H_q·D·T(T+1)/2. Layers with a sliding window w see min(t, w)
  keys. Biases, norms, softmax and activations (O(H) per token) are left out.
- weight bytes: total × 4 / 2 / 1 / 0.5 for fp32 / bf16 / int8 / int4: weights only, without the
  per-group scales a quantizer adds or the tensors it keeps in 16 bits.
- KV cache: 2 (K and V) × layers × H_kv × D × bytes per token; at the context length T, × T (a sliding
  layer keeps min(T, w) tokens); "as MHA" uses H_kv = H_q. The GQA saving is H_q / H_kv.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any, Optional, Union

from .config import Qwen2Config
from .errors import Qwen2PureError, read_json_object
from .presets import META_KEYS, PRESETS, config_json, get_preset, is_preset, resolve_preset_name

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
WEIGHT_DTYPES = ("fp32", "bf16", "int8", "int4")


def parse_dtype(name: str) -> str:
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPE_BYTES:
        raise Qwen2PureError(f"dtype {name!r} is not one of {', '.join(DTYPE_BYTES)} (or float32, bfloat16, float16)")
    return key


# ---- sources: a preset name, a checkpoint folder, a config.json path --------------------------------------

def load_source(source) -> tuple[dict, str, str]:
    """(config.json dict, display name, kind) for a preset name, a folder or a .json file; reads no weights.

    kind is 'preset', 'folder', 'file' or 'dict'. A preset dict keeps its `_provenance`, `_sources` and
    `_published` keys.
    """
    if isinstance(source, dict):
        return dict(source), str(source.get("_name_or_path") or "config"), "dict"
    if hasattr(source, "to_dict") and hasattr(source, "num_hidden_layers"):  # a Qwen2Config
        return source.to_dict(), "config", "dict"
    text = os.fspath(source)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise Qwen2PureError(f"{path}: folder has no config.json")
        return read_json_object(cfg_path), path.name or str(path), "folder"
    if path.is_file():
        if path.suffix != ".json":
            raise Qwen2PureError(f"{path}: expected a checkpoint folder or a config.json file "
                                 "(inspect reads only config.json; convert a .gguf first with `qwen2-pure convert`)")
        return read_json_object(path), str(path), "file"
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith(".json") or \
        (("/" in text or os.sep in text) and not text.lower().startswith("qwen/"))
    if looks_like_path and not is_preset(text):
        raise Qwen2PureError(f"{text}: no such folder or file")
    preset = get_preset(text)  # raises with close matches for an unknown name
    return preset, resolve_preset_name(text), "preset"



# ---- the architecture numbers a count needs ---------------------------------------------------------------

def _arch(cfg: Qwen2Config) -> dict:
    """The numbers the counts need, from `Qwen2Config`: the one reading of a config.json that the loader and the
    model use too (defaults, derived head_dim, which layers are MoE and which slide), so inspect counts the
    model `load_model` would build."""
    n = cfg.num_hidden_layers
    moe_layers = [i for i in range(n) if cfg.is_moe_layer(i)]
    a: dict[str, Any] = {
        "model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size, "head_dim": cfg.head_dim, "tied": cfg.tie_word_embeddings,
        "context": cfg.max_position_embeddings, "qkv_bias": cfg.qkv_bias, "moe": bool(moe_layers),
        "moe_layers": moe_layers, "intermediate_size": cfg.intermediate_size,  # unused when every layer is MoE
        "windows": [cfg.layer_window(i) for i in range(n)],
    }
    if moe_layers:
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            a[key] = getattr(cfg, key)
    return a


# ---- counts ------------------------------------------------------------------------------------------------

def count_params(a: dict) -> dict:
    """Per-part parameter counts (and the per-token matmul weights) from the numbers `_arch` extracted."""
    H, L, V = a["hidden_size"], a["num_hidden_layers"], a["vocab_size"]
    Hq, Hkv, D = a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]
    attn_w = H * Hq * D + 2 * H * Hkv * D + Hq * D * H
    attn_b = (Hq * D + 2 * Hkv * D) if a["qkv_bias"] else 0
    n_moe = len(a["moe_layers"])
    n_dense = L - n_moe
    mlp = {"dense": n_dense * 3 * H * (a["intermediate_size"] or 0)}
    active_mlp = mlp["dense"]
    if a["moe"]:
        E, k = a["num_experts"], a["num_experts_per_tok"]
        expert = 3 * H * a["moe_intermediate_size"]
        mlp["router"] = n_moe * H * E
        mlp["experts"] = n_moe * E * expert
        mlp["shared_expert"] = n_moe * 3 * H * a["shared_expert_intermediate_size"]
        mlp["shared_expert_gate"] = n_moe * H
        active_mlp += mlp["router"] + n_moe * min(k, E) * expert + mlp["shared_expert"] + mlp["shared_expert_gate"]
    parts = {
        "embed": V * H,
        "attention": L * (attn_w + attn_b),
        "mlp": sum(mlp.values()),
        "norms": L * 2 * H + H,
        "lm_head": 0 if a["tied"] else V * H,
    }
    total = sum(parts.values())
    embedding = parts["embed"] + parts["lm_head"]
    active = total - parts["mlp"] + active_mlp
    matmul = L * attn_w + active_mlp + V * H  # every weight one token multiplies; the head even when tied
    return {"parts": parts, "mlp_detail": mlp, "total": total, "embedding": embedding, "active": active,
            "matmul_per_token": matmul}


def _visible_keys_sum(T: int, w: Optional[int]) -> int:
    """Σ_{t=1..T} min(t, w): keys a causal prefill of T tokens attends to, in a layer with window w."""
    if w is None or T <= w:
        return T * (T + 1) // 2
    return w * (w + 1) // 2 + (T - w) * w


def flops(a: dict, matmul: int, T: int) -> dict:
    per_key = 4 * a["num_attention_heads"] * a["head_dim"]  # QKᵀ and AV, one layer, one visible key
    decode_attn = sum(per_key * (T if w is None else min(T, w)) for w in a["windows"])
    prefill_attn = sum(per_key * _visible_keys_sum(T, w) for w in a["windows"])
    head = a["vocab_size"] * a["hidden_size"]
    return {
        "context": T,
        "matmul_params_per_token": matmul,
        "weights_per_token": 2 * matmul,
        "decode_per_token": 2 * matmul + decode_attn,
        "decode_attention": decode_attn,
        "prefill_total": 2 * matmul * T + prefill_attn,
        "prefill_per_token": (2 * matmul * T + prefill_attn) / T if T else 0.0,
        # generation needs the logits of the last prompt token only: the head runs once, not T times
        "prefill_total_last_logits": 2 * matmul * T + prefill_attn - 2 * head * (T - 1),
        "formula": "decode at T: 2*N + 4*L*H_q*D*T; prefill of T: 2*N*T + 4*L*H_q*D*T*(T+1)/2 "
                   "(N = matmul weights per token, head included; causal, visible keys only)",
    }


def kv_cache(a: dict, T: int, dtype: str) -> dict:
    nbytes = DTYPE_BYTES[dtype]
    L, Hq, Hkv, D = a["num_hidden_layers"], a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]
    kept = sum(T if w is None else min(T, w) for w in a["windows"])  # tokens held, summed over layers
    return {
        "dtype": dtype, "bytes_per_element": nbytes, "context": T,
        "per_token": math.ceil(2 * L * Hkv * D * nbytes), "per_token_mha": math.ceil(2 * L * Hq * D * nbytes),
        "at_context": math.ceil(2 * Hkv * D * nbytes * kept), "at_context_mha": math.ceil(2 * Hq * D * nbytes * kept),
        "gqa_saving": Hq / Hkv if Hkv else None,
        "formula": "2 (K,V) x layers x H_kv x head_dim x bytes per token",
    }


# ---- the meta-device model ----------------------------------------------------------------------------------

class _SkipInit:
    """Skips torch.nn.init while building on the meta device (as loading._build does): meta tensors need no
    values, and the init functions' first call imports torch._dynamo (~2 s)."""

    def __enter__(self):
        import torch

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "__module__", None) == "torch.nn.init":
                    return args[0] if args else kwargs.get("tensor")
                return func(*args, **kwargs)

        self.mode = Mode()
        self.device = torch.device("meta")
        self.device.__enter__()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.device.__exit__(*exc)
        return False


def meta_model(cfg, source: str = "config.json"):
    """Our `Qwen2ForCausalLM` for config `cfg` (a dict or Qwen2Config) on the meta device: shapes, no memory.

    Raises Qwen2PureError when the config is one `Qwen2Config` or the model class does not (yet) accept.
    """
    from .model import Qwen2ForCausalLM
    if not isinstance(cfg, Qwen2Config):
        cfg = Qwen2Config.from_dict(config_json(cfg), source=source)
    try:
        with _SkipInit():
            return Qwen2ForCausalLM(cfg)
    except Qwen2PureError:
        raise
    except Exception as e:  # a config the model class cannot build yet (e.g. MoE before it lands)
        raise Qwen2PureError(f"{source}: Qwen2ForCausalLM cannot be built for this config "
                             f"({type(e).__name__}: {e})") from None


def _parts_of_model(model) -> tuple[dict, dict]:
    """Parameter count per part, and per MLP sub-part, of a built model, by Hugging Face parameter names."""
    parts = dict.fromkeys(("embed", "attention", "mlp", "norms", "lm_head"), 0)
    mlp: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        if "embed_tokens" in name:
            part = "embed"
        elif name.startswith("lm_head"):
            part = "lm_head"
        elif ".self_attn." in name:
            part = "attention"
        elif ".mlp." in name:
            part = "mlp"
            sub = ("router" if ".mlp.gate." in name else "experts" if ".mlp.experts." in name
                   else "shared_expert_gate" if ".mlp.shared_expert_gate." in name
                   else "shared_expert" if ".mlp.shared_expert." in name else "dense")
            mlp[sub] = mlp.get(sub, 0) + p.numel()
        elif "norm" in name:
            part = "norms"
        else:
            part = "other"
        parts[part] = parts.get(part, 0) + p.numel()
    return parts, mlp


# ---- the report ------------------------------------------------------------------------------------------------

def _parse_published(text: str) -> tuple[float, float]:
    """('7.62B') -> (7.62e9, 1e7): the value and one unit of its last digit."""
    t = text.strip().upper().rstrip("B")
    decimals = len(t.split(".")[1]) if "." in t else 0
    return float(t) * 1e9, 10.0 ** (9 - decimals)


def published_checks(published: dict, report: dict) -> dict:
    """Each published figure against the computed one: equal up to the rounding (or truncation) of its last
    digit, i.e. |computed − published| < one unit of that digit; `exact_total` must be equal."""
    checks = {}
    for key, computed in (("total", report["total_params"]), ("non_embedding", report["non_embedding_params"]),
                          ("active", report["active_params"])):
        if key in published:
            value, unit = _parse_published(published[key])
            checks[key] = {"published": published[key], "computed": computed,
                           "ok": abs(computed - value) < unit}
    if "exact_total" in published:
        checks["exact_total"] = {"published": published["exact_total"], "computed": report["total_params"],
                                 "ok": published["exact_total"] == report["total_params"]}
    return checks


def inspect_config(cfg, *, context: Optional[int] = None, kv_dtype: str = "bf16", check_model: bool = True,
                   name: Optional[str] = None) -> dict:
    """The accounting report for a config.json dict, a `Qwen2Config`, a preset name or a folder/config.json path.

    context: T for FLOPs and KV bytes (default: max_position_embeddings). kv_dtype: the KV-cache dtype.
    check_model: also build our model on the meta device and compare its parameter counts part by part.
    """
    d, display, kind = load_source(cfg)
    name = name or display
    provenance = d.get("_provenance")
    sources = list(d.get("_sources") or [])
    published = d.get("_published")
    cfg = Qwen2Config.from_dict(config_json(d), source=name)
    a = _arch(cfg)
    T = a["context"] if context is None else int(context)
    if T < 1:
        raise Qwen2PureError(f"context={T} must be >= 1")
    kv_dtype = parse_dtype(kv_dtype)
    c = count_params(a)
    report: dict[str, Any] = {
        "name": name, "kind": kind, "model_type": a["model_type"],
        "total_params": c["total"],
        "non_embedding_params": c["total"] - c["embedding"],
        "active_params": c["active"],
        "active_non_embedding_params": c["active"] - c["embedding"],
        "embedding_params": c["embedding"],
        "params": c["parts"],
        "mlp_detail": c["mlp_detail"],
        "architecture": {
            "layers": a["num_hidden_layers"], "hidden_size": a["hidden_size"],
            "heads": a["num_attention_heads"], "kv_heads": a["num_key_value_heads"], "head_dim": a["head_dim"],
            "group_size": a["num_attention_heads"] / a["num_key_value_heads"] if a["num_key_value_heads"] else None,
            "intermediate_size": a["intermediate_size"], "vocab_size": a["vocab_size"], "tied": a["tied"],
            "context": a["context"], "qkv_bias": a["qkv_bias"],
            "sliding_layers": sum(w is not None for w in a["windows"]),
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
            **({"num_experts": a["num_experts"], "num_experts_per_tok": a["num_experts_per_tok"],
                "moe_intermediate_size": a["moe_intermediate_size"],
                "shared_expert_intermediate_size": a["shared_expert_intermediate_size"],
                "moe_layers": len(a["moe_layers"]), "norm_topk_prob": cfg.norm_topk_prob} if a["moe"] else {}),
        },
        "flops": flops(a, c["matmul_per_token"], T),
        "weight_bytes": {k: math.ceil(c["total"] * DTYPE_BYTES[k]) for k in WEIGHT_DTYPES},
        "kv_cache": kv_cache(a, T, kv_dtype),
        "provenance": provenance,
        "sources": sources,
        "published": None,
        "model_check": {"built": False, "total": None, "parts": None, "matches": None, "note": "not requested"},
        "definitions": {
            "non_embedding_params": "total - embed_tokens - lm_head (lm_head is 0 when tied)",
            "active_params": "non-expert parameters + top-k routed experts + shared expert (= total if dense)",
        },
    }
    if published:
        report["published"] = {**published, "checks": published_checks(published, report)}
    if check_model:
        report["model_check"] = _check_against_model(cfg, name, c["parts"], c["mlp_detail"])
    return report


def _check_against_model(cfg: Qwen2Config, name: str, parts: dict, mlp_detail: dict) -> dict:
    try:
        model = meta_model(cfg, source=name)
    except Qwen2PureError as e:
        return {"built": False, "total": None, "parts": None, "matches": None,
                "note": f"analytic counts only: {e}"}
    got, got_mlp = _parts_of_model(model)
    total = sum(p.numel() for p in model.parameters())
    matches = (total == sum(parts.values()) and not got.get("other")
               and all(got.get(k, 0) == v for k, v in parts.items())
               and all(got_mlp.get(k, 0) == v for k, v in mlp_detail.items()))
    note = ("meta-device Qwen2ForCausalLM: every part equals the analytic count" if matches else
            f"meta-device Qwen2ForCausalLM DIFFERS: {got} {got_mlp} vs analytic {parts} {mlp_detail}")
    return {"built": True, "total": total, "parts": got, "mlp_detail": got_mlp, "matches": matches, "note": note}


# ---- text -------------------------------------------------------------------------------------------------

def fmt_params(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return f"{int(n)}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g} B"


def fmt_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _arch_line(r: dict) -> str:
    a = r["architecture"]
    mlp = (f"MoE {a['num_experts']} experts (top-{a['num_experts_per_tok']}) of {a['moe_intermediate_size']} "
           f"+ shared {a['shared_expert_intermediate_size']} in {a['moe_layers']}/{a['layers']} layers"
           if "num_experts" in a else f"MLP {a['intermediate_size']}")
    group = a["group_size"]
    return (f"{r['model_type']}: {a['layers']} layers, hidden {a['hidden_size']}, {a['heads']} query / "
            f"{a['kv_heads']} KV heads of {a['head_dim']} (group {group:g}), {mlp}, vocab {a['vocab_size']}, "
            f"{'tied' if a['tied'] else 'untied'} lm_head, context {a['context']}")


TEXT_WIDTH = 110


def _wrap(text: str, initial: str, subsequent: str, width: int = TEXT_WIDTH) -> list[str]:
    """Lines of at most `width` characters, broken between words only: a URL or a name such as
    Qwen2.5-Coder-32B-Instruct is never cut (a word longer than the line gets a line of its own)."""
    return textwrap.wrap(text, width, initial_indent=initial, subsequent_indent=subsequent,
                         break_long_words=False, break_on_hyphens=False)


def format_report(r: dict) -> str:
    a, p, f, kv = r["architecture"], r["params"], r["flops"], r["kv_cache"]
    total = r["total_params"]
    lines = [f"{r['name']}  ({r['kind']})"]
    if r.get("provenance"):
        lines += _wrap(f"values: {r['provenance']}", "  ", "    ")
        for source in r.get("sources") or []:
            lines += _wrap(f"- {source}", "    ", "      ")
    lines += ["", "architecture", f"  {_arch_line(r)}", "", "parameters"]
    notes = {
        "embed": f"embed_tokens, {a['vocab_size']} x {a['hidden_size']}",
        "attention": "q/k/v/o weights, q/k/v biases" if a["qkv_bias"] else "q/k/v/o weights",
        "mlp": "router, experts, shared expert and gate" if "num_experts" in a else "gate/up/down (SwiGLU)",
        "norms": "2 RMSNorms per layer + final",
        "lm_head": "tied: shares embed_tokens" if a["tied"] else f"{a['vocab_size']} x {a['hidden_size']}",
    }
    for part, n in p.items():
        lines.append(f"  {part:<22}{fmt_params(n):>11}  {100 * n / total:5.1f}%  {notes[part]}")
        if part == "mlp" and "num_experts" in a:
            for sub, m in r["mlp_detail"].items():
                if m:
                    lines.append(f"    {sub:<20}{fmt_params(m):>11}  {100 * m / total:5.1f}%")
    lines += [
        f"  {'total':<22}{fmt_params(total):>11}  {total:,}",
        f"  {'non-embedding':<22}{fmt_params(r['non_embedding_params']):>11}  total - embed_tokens - untied lm_head",
        f"  {'active per token':<22}{fmt_params(r['active_params']):>11}  "
        + ("non-expert + top-k experts + shared expert" if "num_experts" in a else "(dense: all)"),
    ]
    pub = r.get("published")
    if pub:
        checks = pub["checks"]
        shown = ", ".join(f"{k.replace('_', '-')} {v['published']:,}" if isinstance(v["published"], int)
                          else f"{k.replace('_', '-')} {v['published']}" for k, v in checks.items())
        verdict = "matches" if all(v["ok"] for v in checks.values()) else \
            "DIFFERS: " + ", ".join(k for k, v in checks.items() if not v["ok"])
        lines.append(f"  {'published':<22}{shown}: {verdict}")
        lines += _wrap(f"source: {pub['source']}", " " * 24, " " * 26)
    lines.append(f"  {'model check':<22}{r['model_check']['note']}")
    T = f["context"]
    lines += [
        "", f"compute per token (T = {T:,})",
        f"  {'matmul weights':<22}{fmt_params(f['matmul_params_per_token']):>11}  x 2 = "
        f"{fmt_flops(f['weights_per_token'])}",
        f"  {'decode at T':<22}{fmt_flops(f['decode_per_token']):>11}  (attention {fmt_flops(f['decode_attention'])})",
        f"  {'prefill of T tokens':<22}{fmt_flops(f['prefill_total']):>11}  = "
        f"{fmt_flops(f['prefill_per_token'])} per token; "
        f"{fmt_flops(f['prefill_total_last_logits'])} with the head on the last token only",
        "", "weights",
        "  " + "   ".join(f"{k} {fmt_bytes(v)}" for k, v in r["weight_bytes"].items())
        + "   (weights only; no quantization scales)",
        "", f"KV cache ({kv['dtype']})",
        f"  {'per token':<22}{fmt_bytes(kv['per_token']):>11}  = 2 x {a['layers']} layers x {a['kv_heads']} KV heads"
        f" x {a['head_dim']} x {kv['bytes_per_element']:g} B",
        f"  {'as MHA':<22}{fmt_bytes(kv['per_token_mha']):>11}  ({a['heads']} KV heads): GQA saves "
        f"{kv['gqa_saving']:g}x",
        f"  {'at T':<22}{fmt_bytes(kv['at_context']):>11}  (as MHA: {fmt_bytes(kv['at_context_mha'])})",
    ]
    return "\n".join(lines)


def format_preset_list(width: int = TEXT_WIDTH) -> str:
    """`inspect --list`: one preset a row (name, model type, context, where its values come from), the
    provenance wrapped between words under its own column; `inspect NAME` prints the sources in full."""
    name_w = max(len(n) for n in PRESETS) + 2
    type_w = max(len(p["model_type"]) for p in PRESETS.values()) + 2
    lead_w = name_w + type_w + len("131072 ctx  ")
    lines = []
    for name, preset in PRESETS.items():
        lead = f"{name:<{name_w}}{preset['model_type']:<{type_w}}{preset['max_position_embeddings']:>6} ctx  "
        lines += _wrap(lead + preset["_provenance"], "", " " * lead_w, max(width, lead_w + 40))
    return "\n".join(lines)


def compare_rows(r: dict) -> list[tuple[str, str]]:
    a, f, kv = r["architecture"], r["flops"], r["kv_cache"]
    rows = [
        ("model_type", r["model_type"]),
        ("layers", a["layers"]), ("hidden size", a["hidden_size"]), ("query heads", a["heads"]),
        ("KV heads", a["kv_heads"]), ("head_dim", a["head_dim"]), ("group size", f"{a['group_size']:g}"),
        ("intermediate", a["intermediate_size"] if "num_experts" not in a else
         f"{a['num_experts']}x{a['moe_intermediate_size']} top-{a['num_experts_per_tok']} "
         f"+ {a['shared_expert_intermediate_size']}"),
        ("context", a["context"]), ("vocab", a["vocab_size"]), ("tied embeddings", a["tied"]),
        ("rope_theta", a["rope_theta"]), ("rms_norm_eps", a["rms_norm_eps"]),
        ("params", fmt_params(r["total_params"])), ("non-embedding", fmt_params(r["non_embedding_params"])),
        ("active", fmt_params(r["active_params"])),
        (f"weights ({kv['dtype']})", fmt_bytes(r["total_params"] * kv["bytes_per_element"])),
        ("weight FLOPs/token", fmt_flops(f["weights_per_token"])),
        (f"KV/token ({kv['dtype']})", fmt_bytes(kv["per_token"])),
        ("KV/token as MHA", fmt_bytes(kv["per_token_mha"])),
        ("GQA saving", f"{kv['gqa_saving']:g}x"),
        ("T (FLOPs, KV)", f"{kv['context']:,}"),
        ("decode FLOPs at T", fmt_flops(f["decode_per_token"])),
        ("KV at T", fmt_bytes(kv["at_context"])),
        ("KV at T as MHA", fmt_bytes(kv["at_context_mha"])),
    ]
    return [(k, str(v)) for k, v in rows]


def format_compare(r1: dict, r2: dict) -> str:
    rows1, rows2 = compare_rows(r1), compare_rows(r2)
    w0 = max(len(k) for k, _ in rows1)
    w1 = max(len(r1["name"]), *(len(v) for _, v in rows1))
    w2 = max(len(r2["name"]), *(len(v) for _, v in rows2))
    out = [f"{'':<{w0}}  {r1['name']:>{w1}}  {r2['name']:>{w2}}",
           f"{'':<{w0}}  {'-' * w1}  {'-' * w2}"]
    for (k, v1), (_, v2) in zip(rows1, rows2):
        mark = "" if v1 == v2 else "  *"
        out.append(f"{k:<{w0}}  {v1:>{w1}}  {v2:>{w2}}{mark}")
    return "\n".join(out)


def module_tree(cfg, source: str = "config.json") -> str:
    """`print(model)` of our model built on the meta device (a 72B model costs no memory)."""
    return repr(meta_model(cfg, source=source))


# ---- plot -------------------------------------------------------------------------------------------------

def plot_reports(reports: list[dict], path: Union[str, os.PathLike]) -> Path:
    """Write a PNG with two panels: where the parameters go, and KV-cache bytes vs context (GQA vs MHA)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Qwen2PureError("--plot needs matplotlib: pip install matplotlib "
                             "(or pip install \"qwen2-pure[plot]\")") from None
    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"embed": "#4c72b0", "attention": "#dd8452", "mlp": "#55a868", "norms": "#8172b3",
              "lm_head": "#c44e52", "experts (unused per token)": "#b7dcb9"}
    names = [r["name"] for r in reports]
    for i, r in enumerate(reports):
        left = 0.0
        segments = {}
        for part, n in r["params"].items():
            idle = r["total_params"] - r["active_params"]  # routed experts a token does not use
            segments[part] = n - idle if part == "mlp" else n
            if part == "mlp" and idle:
                segments["experts (unused per token)"] = idle
        for part, n in segments.items():
            ax1.barh(i, n / 1e9, left=left, color=colors[part], label=part)
            left += n / 1e9
        ax1.text(left, i, f"  {r['total_params'] / 1e9:.2f} B", va="center")
    handles, labels = ax1.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax1.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)
    ax1.set_yticks(range(len(reports)), names)
    ax1.invert_yaxis()
    ax1.set_xlabel("parameters (billions)")
    ax1.set_title("where the parameters go")
    ax1.margins(x=0.18)
    for r in reports:
        kv, arch = r["kv_cache"], r["architecture"]
        xs = [round(kv["context"] * i / 64) for i in range(65)]
        line, = ax2.plot(xs, [kv["per_token"] * x / 2 ** 30 for x in xs],
                         label=f"{r['name']}: {arch['kv_heads']} KV heads")
        if arch["kv_heads"] != arch["heads"]:
            ax2.plot(xs, [kv["per_token_mha"] * x / 2 ** 30 for x in xs], linestyle="--", color=line.get_color(),
                     label=f"{r['name']} as MHA: {arch['heads']} KV heads")
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel(f"KV cache, GiB ({reports[0]['kv_cache']['dtype']}, batch 1)")
    ax2.set_title("KV-cache bytes vs context: GQA vs MHA")
    ax2.set_xlim(left=0)
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_json(reports: list[dict]) -> str:
    """One JSON object: the report itself, or {"compare": [...]} with the top-level keys of the first."""
    if len(reports) == 1:
        return json.dumps(reports[0], indent=2)
    first = reports[0]
    return json.dumps({"total_params": first["total_params"], "non_embedding_params": first["non_embedding_params"],
                       "active_params": first["active_params"], "compare": reports}, indent=2)


__all__ = ["inspect_config", "load_source", "meta_model", "module_tree", "format_report", "format_compare",
           "format_preset_list", "plot_reports", "report_json", "count_params", "published_checks", "DTYPE_BYTES",
           "META_KEYS"]
