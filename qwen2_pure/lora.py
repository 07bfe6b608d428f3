"""LoRA: wrapping linear layers, peft-format adapters (save and load), merging.

A LoRA layer adds a low-rank update to a frozen linear layer (Hu et al. 2021), exactly as peft does it:

    y = W x + b  +  B(A(dropout(x))) * scaling          scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

- A (r, in) starts kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(in)); B (out, r) starts at zero, so a fresh
  adapter changes nothing. Dropout applies to the LoRA branch input only; Qwen2's q/k/v biases stay in the base.
- A and B are kept in fp32 whatever the base dtype (peft's `autocast_adapter_dtype`): the input is cast to fp32,
  the branch computed in fp32, added to the base output (promoting to fp32) and the sum cast back to the
  activation dtype - the same operations, in the same order, as peft's `lora.Linear.forward`.
- Module names are the Hugging Face ones (our module tree is transformers'), so an adapter's tensors are
  `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` - peft's on-disk names - and adapters
  move between qwen2-pure and peft in both directions.

The wrapper keeps the base layer's `weight` and `bias` as its own parameters, so the base checkpoint's names
(`...q_proj.weight`) do not change when a model is wrapped; the LoRA tensors appear beside them as
`...q_proj.lora_A.weight`.

    model = apply_lora(load_model(src), targets=["q_proj", "v_proj"], r=32, alpha=16)
    save_adapter(model, "out")                     # adapter_model.safetensors + adapter_config.json
    model = load_model(src, adapter="out")         # or load_adapter(model, "out"); peft's adapters too
    merge_lora(model)                              # W += B A scaling; back to plain nn.Linear

adapter_config.json is read off the LoRA layers when an adapter is saved (`adapter_config`): the layers are the
one record of what is wrapped, with which rank, alpha, dropout and scaling; nothing is attached to the model.
Loading sits above this module (`qwen2_pure.loading` applies adapters; `qwen2_pure.loading.export` merges and
writes a model folder); this module imports nothing of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import Qwen2PureError, read_json_object
from .model import Qwen2ForCausalLM
from .safetensors_io import SafetensorsFile, atomic_write_text, write_safetensors

PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model: peft's prefix on every saved key
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older peft / torch.save; read only
ADAPTER_CONFIG = "adapter_config.json"
# LLaMA-Factory's `--lora_target all`: every linear layer of the decoder blocks (never lm_head).
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DTYPE = torch.float32

Targets = Union[str, Sequence[str]]


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update `lora_B(lora_A(dropout(x))) * scaling`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: bool = True):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise Qwen2PureError(f"LoRA rank r={r!r} is invalid: it must be an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise Qwen2PureError(f"lora_dropout={dropout!r} is invalid: it must be in [0, 1)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: the base checkpoint names are unchanged
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.lora_alpha, self.lora_dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=LORA_DTYPE)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=LORA_DTYPE)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init:
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """peft's `init_lora_weights=True`: A kaiming-uniform (a=sqrt(5)), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        # result (activation dtype) + fp32 branch promotes to fp32; then back, as peft does
        return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """(B @ A) * scaling, shape (out, in) like `weight`, in the LoRA dtype (fp32)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}")


# ---- targeting -----------------------------------------------------------------------------------------------

def _layer_index(name: str, layers_pattern) -> Optional[int]:
    """The decoder-layer index in a module name, as peft finds it for `layers_to_transform`."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        m = re.match(r".*\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for p in patterns:
        m = re.match(rf".*\.{p}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def _is_target(name: str, targets: Targets, layers_to_transform=None, layers_pattern=None) -> bool:
    """peft's rule: a string is `re.fullmatch`ed against the full module name; a list entry matches the
    whole name or its last dotted components (`name.endswith("." + t)`)."""
    if isinstance(targets, str):
        hit = re.fullmatch(targets, name) is not None
    else:
        hit = any(name == t or name.endswith("." + t) for t in targets)
    if hit and layers_to_transform is not None:
        wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
        hit = _layer_index(name, layers_pattern) in wanted
    return hit


def _pattern_value(pattern: dict, name: str, default):
    """rank_pattern / alpha_pattern lookup as peft does it: the first key matching the end of the name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _resolve_targets(targets: Targets) -> Targets:
    if isinstance(targets, str):
        if targets == "all":
            return list(ALL_TARGETS)
        if "," in targets and not any(c in targets for c in "()[]{}*+?|\\"):  # LLaMA-Factory's "q_proj,v_proj"
            return [t.strip() for t in targets.split(",") if t.strip()]
        return targets
    targets = list(targets)
    if targets == ["all"]:
        return list(ALL_TARGETS)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise Qwen2PureError(f"LoRA targets={targets!r}: expected module names such as ['q_proj', 'v_proj'] or 'all'")
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """{module name: LoraLinear} of a wrapped model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _wrap(model: nn.Module, targets: Targets, r: int, alpha: float, dropout: float, use_rslora: bool,
          rank_pattern=None, alpha_pattern=None, layers_to_transform=None, layers_pattern=None,
          init: bool = True, where: str = "apply_lora") -> list[str]:
    if lora_modules(model):
        raise Qwen2PureError(f"{where}: the model already has LoRA layers (merge_lora or reload the base first)")
    chosen = [(n, m) for n, m in model.named_modules()
              if n and _is_target(n, targets, layers_to_transform, layers_pattern)]
    if not chosen:
        raise Qwen2PureError(f"{where}: target modules {targets!r} match no module of the model "
                             f"(Qwen2's linear layers: {', '.join(ALL_TARGETS)})")
    for name, module in chosen:  # every target is checked before any is wrapped
        if not isinstance(module, nn.Linear):
            # peft has lora.Embedding for embed_tokens; we do not (an adapter with it is refused on load too)
            raise Qwen2PureError(f"{where}: target '{name}' is a {type(module).__name__}; LoRA wraps linear "
                                 f"layers only (the decoder's {', '.join(ALL_TARGETS)}, and lm_head)")
        if module.weight.is_meta:
            raise Qwen2PureError(f"{where}: '{name}' has no weights yet (meta device); load the model first")
    for name, module in chosen:
        parent_name, _, attr = name.rpartition(".")
        wrapped = LoraLinear(module, _pattern_value(rank_pattern, name, r), _pattern_value(alpha_pattern, name, alpha),
                             dropout, use_rslora, init=init)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, wrapped)
    return [n for n, _ in chosen]


def _target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """peft's `target_modules` for exactly the `wrapped` module names: their last components (["q_proj",
    "v_proj"]) when those select no other module, else the full names (e.g. when only some layers are wrapped)."""
    leaves = sorted({n.rpartition(".")[2] for n in wrapped})
    selected = {n for n, _ in model.named_modules() if n and _is_target(n, leaves)}
    return leaves if selected == set(wrapped) else sorted(wrapped)


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def adapter_config(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    """adapter_config.json of the model's LoRA layers, read off the layers themselves, with only the keys every
    peft since 0.10 accepts (see the reference, section 2.1).

    target_modules name exactly the wrapped modules (`_target_modules`); r and lora_alpha are the values most
    layers have, the others go to rank_pattern / alpha_pattern under their full module names (peft matches a
    pattern key against the end of a module name).
    """
    layers = lora_modules(model)
    if not layers:
        raise Qwen2PureError("the model has no LoRA layers (apply_lora or load_adapter first)")
    for attr in ("lora_dropout_p", "use_rslora"):
        if len({getattr(m, attr) for m in layers.values()}) > 1:
            raise Qwen2PureError(f"the LoRA layers differ in {attr}, which adapter_config.json holds once")
    first = next(iter(layers.values()))
    r = _most_common([m.r for m in layers.values()])
    alpha = _most_common([m.lora_alpha for m in layers.values()])
    return {
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha}, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_dropout": first.lora_dropout_p, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": r,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r}, "revision": None,
        "target_modules": _target_modules(model, list(layers)), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": first.use_rslora,
    }


def apply_lora(model: nn.Module, targets: Targets = ("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
               dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Wrap the target linear layers of `model` with fresh LoRA layers and freeze everything else.

    targets: module names as peft matches them (a list: exact name or last components, e.g. "q_proj";
    a string: a regex `fullmatch`ed on the full name, e.g. r".*\\.(q|v)_proj"), "all" for every linear layer
    of the decoder blocks, or LLaMA-Factory's comma form "q_proj,v_proj". Returns `model` (changed in place).
    """
    targets = _resolve_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, targets, r, alpha, dropout, use_rslora)
    return model


# ---- state dicts, saving ---------------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under peft's on-disk names (`base_model.model.<module>.lora_A.weight`), detached."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike],
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` (`adapter_config`) into `directory` (created),
    each atomically (a reader sees the old file or the whole new one); `PeftModel.from_pretrained` loads the
    result. base_model_name_or_path: what the config names as the base (peft's key; None leaves it empty)."""
    if not lora_modules(model):
        raise Qwen2PureError("save_adapter: the model has no LoRA layers (apply_lora or load_adapter first)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, write in adapter_files(model, base_model_name_or_path).items():
        write(out / name)
    return out


def adapter_files(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    """{file name: a function writing it atomically at the path it is given}: the two files of a peft adapter,
    for `save_adapter` and for folder writers (`qwen2_pure.safetensors_io.write_folder`, training checkpoints)."""
    config = adapter_config(model, None if base_model_name_or_path is None else str(base_model_name_or_path))
    tensors = lora_state_dict(model)
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    return {
        ADAPTER_WEIGHTS: lambda path: write_safetensors(path, specs, iter(tensors.items()), {"format": "pt"}),
        ADAPTER_CONFIG: lambda path: atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n"),
    }


# ---- loading ---------------------------------------------------------------------------------------------------

# Config keys whose non-default values change what the adapter computes; we do not implement them.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "modules_to_save": "modules_to_save (fully trained extra modules)", "layer_replication": "layer_replication",
    "exclude_modules": "exclude_modules", "trainable_token_indices": "trainable_token_indices",
    "lora_bias": "lora_bias (a bias on lora_B)", "use_qalora": "QA-LoRA", "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "arrow_config": "Arrow routing",
}


def read_adapter_config(directory: Union[str, os.PathLike]) -> dict:
    """adapter_config.json of a peft LoRA adapter, checked for features we do not implement."""
    directory = Path(os.path.expanduser(str(directory)))
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise Qwen2PureError(f"{directory}: adapter folder not found")
    if not path.is_file():
        raise Qwen2PureError(f"{directory}: no {ADAPTER_CONFIG} (is this a peft adapter folder?)")
    cfg = read_json_object(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise Qwen2PureError(f"{path}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise Qwen2PureError(f"{path}: {key}={cfg[key]!r}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise Qwen2PureError(f"{path}: bias={cfg['bias']!r}: only bias='none' adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) in (None, [], ""):
            raise Qwen2PureError(f"{path}: '{key}' is missing")
    if not isinstance(cfg["r"], int) or cfg["r"] < 1:
        raise Qwen2PureError(f"{path}: r={cfg['r']!r} is not a positive integer")
    return cfg


def _read_adapter_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, binf = directory / ADAPTER_WEIGHTS, directory / ADAPTER_WEIGHTS_BIN
    if st.is_file():
        with SafetensorsFile(st) as f:
            return {n: f.get(n).clone() for n in f.names()}, st
    if binf.is_file():
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a bad file
            raise Qwen2PureError(f"{binf}: cannot read ({type(e).__name__}: {e})") from None
        return dict(sd), binf
    raise Qwen2PureError(f"{directory}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], trainable: bool = False) -> nn.Module:
    """Wrap `model` with the LoRA adapter saved in `directory` (ours or peft's) and load its tensors, unmerged.

    Strict: a tensor the model has no place for, a LoRA tensor the file lacks, or a shape that disagrees is an
    error naming the file and the key. `trainable=True` leaves the LoRA parameters trainable (to continue
    training from an adapter); otherwise the whole model is frozen, as peft's inference mode does.
    """
    directory = Path(os.path.expanduser(str(directory)))
    cfg = read_adapter_config(directory)
    tensors, path = _read_adapter_tensors(directory)
    targets = cfg["target_modules"]
    if not isinstance(targets, str):
        targets = list(targets)
    r, alpha, rslora = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout") or 0.0)
    pats = dict(rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
                layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"))
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, targets, r, alpha, dropout, rslora, init=False, where=str(directory / ADAPTER_CONFIG), **pats)
    expected = {}
    for name, m in lora_modules(model).items():
        expected[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        expected[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    for key, t in tensors.items():
        if key not in expected:
            hint = " (embedding LoRA, modules_to_save and trained embeddings are not supported)" \
                if key.startswith(PREFIX) else f" (peft's keys start with '{PREFIX}')"
            raise Qwen2PureError(f"{path}: unexpected tensor '{key}': no LoRA layer of the model with "
                                 f"target_modules={targets!r} has that name{hint}")
        want = expected[key]
        if tuple(t.shape) != tuple(want.shape):
            raise Qwen2PureError(f"{path}: tensor '{key}' has shape {list(t.shape)}, the model and "
                                 f"{ADAPTER_CONFIG} (r, rank_pattern) imply {list(want.shape)}")
        if not t.is_floating_point():
            raise Qwen2PureError(f"{path}: tensor '{key}' has dtype {t.dtype}; expected floating point")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise Qwen2PureError(f"{path}: missing tensors: {', '.join(missing[:3])}{more}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])  # fp16/bf16 files are upcast to the fp32 LoRA dtype, like peft
            param.requires_grad_(trainable)
    return model


# ---- merging ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W += (B @ A) * scaling for every LoRA layer, replacing each by a plain nn.Linear; returns `model`.

    A LoRA layer whose weight is shared with another module - lm_head of a `tie_word_embeddings` model,
    whose weight is embed_tokens' - merges into its own copy: adding the delta in place would change the
    embedding too, which the unmerged adapter never does. The merged model is then untied, and its config
    says so (`tie_word_embeddings=False`), so an export writes lm_head.weight. peft's `merge_and_unload`
    adds in place and only warns ("Model with `tie_word_embeddings=True` and the tied_target_modules=
    ['lm_head'] are part of the adapter ... You can opt to merge the adapter after cloning the weights (to
    untie the embeddings)", peft/tuners/tuners_utils.py; huggingface/peft#2777): the cloning is done here.
    """
    owners: dict[int, int] = {}  # id(parameter) -> how many module paths reach it
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    untied = False
    for name, m in lora_modules(model).items():
        weight = m.weight
        if owners[id(weight)] > 1:
            weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied = True
        # peft: `base_layer.weight.data += delta_weight` (delta in fp32, rounded into the weight's dtype)
        weight.data += m.delta_weight().to(weight.device)
        with torch.device("meta"):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight = weight
        if m.bias is not None:
            plain.bias = m.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    if untied and isinstance(model, Qwen2ForCausalLM) and model.config.tie_word_embeddings:
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
    return model
