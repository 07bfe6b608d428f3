"""`load_model` and `load_tokenizer`: from a folder, a GGUF file, a modelscope id, or the demo checkpoint.

A source is resolved to one of two things: an HF-layout folder (config.json, *.safetensors with an
optional index, tokenizer files, generation_config.json) or a `.gguf` file. The model is built on the
meta device, so no memory is spent on random initial weights, and each tensor is then read from its
memory map, cast to the requested dtype and device, and assigned in place of its meta parameter; the
mapped pages are dropped as soon as a tensor is copied, so peak RSS stays near the size of the weights.
Loading is strict: a missing, unexpected or misshaped tensor is an error naming the file, the tensor
and both shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..config import GenerationConfig, Qwen2Config
from ..errors import Qwen2PureError, read_json_object
from ..model import Qwen2ForCausalLM
from ..quant import QuantLinear, check_mode, replace_linears
from ..settings import Settings
from .safetensors_io import SafetensorsFile

Source = Union[str, os.PathLike, None]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# Tensors some checkpoints carry that are derived, not learned (old transformers saved RoPE tables).
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(dtype, default: Optional[str] = None) -> torch.dtype:
    """torch dtype from a torch.dtype, a name ('bfloat16', 'bf16', ...), or None/'auto' (= `default`)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise Qwen2PureError(f"dtype={dtype} is not supported (use float32, bfloat16 or float16)")
        return dtype
    if dtype is None or dtype == "auto":
        dtype = default or "float32"
    if dtype not in _DTYPES:
        raise Qwen2PureError(f"dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_source(source: Source) -> Path:
    """A local folder or .gguf file for `source`: a path, a modelscope id, None or "demo" for the demo model, or
    "qwen2.5-coder-1.5b-instruct" (the `coder-1-5b` extra's checkpoint)."""
    if source is None:
        from .demo import demo_model_path
        return demo_model_path()
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise Qwen2PureError(f"{path}: expected a model folder or a .gguf file")
        return path
    text = str(source)
    from .demo import PACKAGED
    if text in PACKAGED:  # "demo", "qwen2.5-coder-1.5b-instruct": assembled from their PyPI parts
        return PACKAGED[text]()
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") != 1
    if looks_local:
        raise Qwen2PureError(f"{source}: no such folder or file")
    return _download(text)


def _download(model_id: str) -> Path:
    """Fetch a hub id such as qwen/Qwen2-7B-Instruct through modelscope, as the Qwen docs do."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise Qwen2PureError(
            f"'{model_id}' is not a local folder or file, and downloading it needs modelscope: "
            f"pip install \"qwen2-pure[hub]\" (or download the model elsewhere and pass its folder)") from None
    try:
        return Path(snapshot_download(model_id, allow_patterns=[
            "*.json", "*.safetensors", "merges.txt", "vocab.json", "LICENSE", "README.md"]))
    except Exception as e:  # modelscope raises many kinds: connection, HTTP, not found
        raise Qwen2PureError(
            f"could not download '{model_id}' from modelscope ({type(e).__name__}: {str(e)[:200]}). "
            "If this machine is offline, download the model elsewhere (modelscope download "
            f"--model {model_id} --local_dir DIR) and pass that folder instead of the id") from None


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the folder's .safetensors files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise Qwen2PureError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {name: folder / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise Qwen2PureError(f"{index}: lists shard {f.name}, which is not in {folder}")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are not loaded; convert them to safetensors)" \
            if pickles else ""
        raise Qwen2PureError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    files: dict[str, Path] = {}
    for shard in shards:
        with SafetensorsFile(shard) as f:
            for name in f.names():
                files[name] = shard
    return files


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)


class _StrictAssigner:
    """Assigns checkpoint tensors to a meta-device model, checking names and shapes as it goes."""

    def __init__(self, model: Qwen2ForCausalLM, dtype: torch.dtype, device, quantize: Optional[str] = None):
        self.model, self.dtype, self.device = model, dtype, device
        self.quantized: dict[str, QuantLinear] = {}
        if quantize is not None:  # swap the target linears for (empty) quantized ones, filled as weights arrive
            with torch.device("meta"):
                layers = replace_linears(model, quantize, lambda m, kind: QuantLinear(
                    m.in_features, m.out_features, m.bias is not None, kind, dtype=dtype))
            self.quantized = {name + ".weight": layer for name, layer in layers.items()}
        # named_parameters() lists a tied lm_head once, under model.embed_tokens.weight
        self.expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.expected.update({n: (q.out_features, q.in_features) for n, q in self.quantized.items()})
        self.loaded: set[str] = set()
        self.tied = model.config.tie_word_embeddings

    def wants(self, name: str, where: str) -> bool:
        if name.endswith(_DERIVED_SUFFIXES) or (self.tied and name == "lm_head.weight"):
            return False
        if name not in self.expected:
            raise Qwen2PureError(f"{where}: unexpected tensor '{name}' (not part of a Qwen2 model with this "
                                 "config.json; is the config for a different model?)")
        return True

    def assign(self, name: str, shape: tuple, fetch: Callable[[], torch.Tensor], where: str,
               fresh: bool = False) -> None:
        want = self.expected[name]
        if tuple(shape) != want:
            raise Qwen2PureError(f"{where}: tensor '{name}' has shape {list(shape)}, the config implies {list(want)}")
        t = fetch()
        # a memory-mapped view must be copied out of the file; a freshly dequantized tensor need not be
        if name in self.quantized:  # quantized right away: the float weight never stays in memory
            self.quantized[name].load_weight(t)
        else:
            t = t.to(device=self.device, dtype=self.dtype, copy=not fresh)
            _set_parameter(self.model, name, t)
        self.loaded.add(name)

    def takes_int4(self, name: str) -> bool:
        return name in self.quantized and self.quantized[name].mode == "int4"

    def assign_int4(self, name: str, values, where: str) -> None:
        """A GGUF's own 4-bit blocks, kept without a round trip through floats (see loading.gguf)."""
        q, s, m = values
        want = self.expected[name]
        if tuple(q.shape) != want:
            raise Qwen2PureError(f"{where}: tensor '{name}' has shape {list(q.shape)}, the config implies {list(want)}")
        self.quantized[name].load_int4(q, s, m)
        self.loaded.add(name)

    def finish(self, where: str) -> Qwen2ForCausalLM:
        missing = sorted(set(self.expected) - self.loaded - ({"lm_head.weight"} if self.tied else set()))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise Qwen2PureError(f"{where}: missing tensors: {', '.join(missing[:5])}{more}")
        head = self.quantized.get("lm_head.weight")
        if self.tied and head is not None:  # a tied head gets its own quantized copy of the embedding
            head.load_weight(self.model.model.embed_tokens.weight)
        self.model.tie_weights()
        return self.model.eval()


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips `torch.nn.init` calls: meta parameters need no initial values, and initializing them would
    run torch's Python reference kernels, whose first use imports torch._dynamo and sympy (~2 s, ~80 MB RSS)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **kwargs)


def _build(cfg: Qwen2Config, generation_config: GenerationConfig) -> Qwen2ForCausalLM:
    with torch.device("meta"), _SkipInit():
        return Qwen2ForCausalLM(cfg, generation_config)


def _load_folder(folder: Path, dtype, device, quantize=None) -> Qwen2ForCausalLM:
    cfg = Qwen2Config.from_file(folder / "config.json")
    gen_cfg = GenerationConfig.from_file(folder / "generation_config.json", cfg)
    files = _checkpoint_files(folder)
    assigner = _StrictAssigner(_build(cfg, gen_cfg), parse_dtype(dtype, cfg.torch_dtype), device, quantize)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for path, names in by_file.items():
        with SafetensorsFile(path) as f:
            present = set(f.names())
            for name in names:
                if name not in present:
                    raise Qwen2PureError(f"{path}: tensor '{name}' is listed in the index but not in this shard")
                if assigner.wants(name, str(path)):
                    assigner.assign(name, f.shape(name), lambda: f.get(name), str(path))
                    f.release(name)
    return assigner.finish(str(folder))


def _load_gguf(path: Path, dtype, device, quantize=None) -> Qwen2ForCausalLM:
    from .demo import generation_config_for
    from .gguf import gguf_config, iter_gguf_tensors, open_gguf
    from .gguf_tokenizer import gguf_tokenizer_files
    reader = open_gguf(path)
    cfg = Qwen2Config.from_dict(gguf_config(reader), source=str(path))
    # a GGUF has token ids but no sampling values; the demo's come with it (loading.demo.GENERATION_CONFIG)
    gen_cfg = GenerationConfig.from_dict(generation_config_for(path) or gguf_tokenizer_files(reader)[2], cfg,
                                         source=f"{path} (tokenizer metadata)")
    # GGUF tensors are quantized: they are dequantized to fp32 one at a time, then cast
    assigner = _StrictAssigner(_build(cfg, gen_cfg), parse_dtype(dtype, "float32"), device, quantize)
    # with quantize="int4", 4-bit blocks of 32 (Q4_0, Q4_1, Q4_K) are taken as they are, not requantized
    tensors = iter_gguf_tensors(reader, keep_int4=assigner.takes_int4 if quantize == "int4" else None)
    for name, tensor in tensors:
        if not assigner.wants(name, str(path)):
            continue
        if isinstance(tensor, tuple):
            assigner.assign_int4(name, tensor, str(path))
        else:
            assigner.assign(name, tuple(tensor.shape), lambda: tensor, str(path), fresh=True)
    return assigner.finish(str(path))


@dataclass
class Loaded:
    """What `load` read: the model, its tokenizer and generation config, and where they came from.

    model: the Qwen2ForCausalLM, in eval mode, configured with `settings`. tokenizer: its Tokenizer (None with
    `tokenizer=False`). generation_config: generation_config.json read once (`qwen2_pure.config.GenerationConfig`;
    also `model.generation_config`). source: the folder or .gguf file the weights came from. adapter: the LoRA
    adapter folder applied unmerged, or None. quantization: "int8", "int4" or None. settings: how the ops
    compute (`qwen2_pure.settings.Settings`).
    """

    model: Qwen2ForCausalLM
    tokenizer: Any
    generation_config: GenerationConfig
    source: str
    adapter: Optional[str] = None
    quantization: Optional[str] = None
    settings: Settings = field(default_factory=Settings)

    @property
    def name(self) -> str:
        """The checkpoint's folder or file name, e.g. 'Qwen2.5-7B-Instruct' (what a server lists)."""
        name = Path(self.source).name
        return name[:-5] if name.endswith(".gguf") else name


def load(source: Source = None, dtype=None, device=None, adapter=None, quantize: Optional[str] = None,
         compile: Optional[bool] = None, settings: Optional[Settings] = None, tokenizer: bool = True) -> Loaded:
    """Load a Qwen2 checkpoint — a folder, a .gguf file, a modelscope id, or (None) the demo — as a `Loaded`.

    dtype: torch dtype or name; None/'auto' takes config.json's `torch_dtype` (fp32 when absent).
    device: where the weights go (default CPU).
    adapter: a peft LoRA adapter folder (ours or peft's), applied unmerged on top of the base
    (see `qwen2_pure.lora.load_adapter`).
    quantize: None, "int8" or "int4": weight-only quantization of the linear layers, done tensor by tensor
    while loading (`qwen2_pure.quant`); the activations keep `dtype`.
    settings: how the ops compute (`qwen2_pure.settings.Settings`); default: `Settings.from_env()`, i.e. the
    library's defaults changed by QWEN2_PURE_FAST / QWEN2_PURE_KERNELS / QWEN2_PURE_COMPILE where set.
    compile: shorthand for settings' `compile` (the decode step compiled with torch.compile on CPU, a CUDA
    graph on CUDA; `qwen2_pure.fast`); the first generation pays the compilation.
    Raises `Qwen2PureError` naming the file, tensor or argument at fault.
    """
    quantize = check_mode(quantize)
    if settings is None:
        settings = Settings.from_env(compile=compile)
    elif compile is not None:
        settings = settings.replace(compile=compile)
    path = resolve_source(source)
    if quantize is not None and adapter is not None:
        raise Qwen2PureError("adapter= and quantize= together are not supported: merge the adapter first "
                             "(qwen2-pure export), then quantize the merged model")
    if adapter is not None:  # a bad adapter folder fails before minutes of loading the base
        from ..lora import read_adapter_config
        read_adapter_config(adapter)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if quantize is not None and device.type != "cpu":
        raise Qwen2PureError(f"quantize={quantize!r} runs on PyTorch's CPU kernels for packed weights: "
                             f"use device='cpu' (got {device})")
    model = _load_gguf(path, dtype, device, quantize) if path.is_file() else _load_folder(path, dtype, device, quantize)
    if adapter is not None:
        from ..lora import load_adapter
        load_adapter(model, adapter)
    model.configure(settings)
    return Loaded(model=model, tokenizer=load_tokenizer(path) if tokenizer else None,
                  generation_config=model.generation_config, source=str(path),
                  adapter=None if adapter is None else str(adapter), quantization=quantize, settings=settings)


def load_model(source: Source = None, dtype=None, device=None, adapter=None, quantize: Optional[str] = None,
               compile: Optional[bool] = None, settings: Optional[Settings] = None) -> Qwen2ForCausalLM:
    """The model of `load(...)` (same arguments), in eval mode; its `generation_config` is the checkpoint's
    generation_config.json (`qwen2_pure.config.GenerationConfig`)."""
    return load(source, dtype=dtype, device=device, adapter=adapter, quantize=quantize, compile=compile,
                settings=settings, tokenizer=False).model


def load_tokenizer(source: Source = None):
    """The tokenizer (with chat template and stop ids) of the same sources `load_model` takes."""
    from ..tokenizer import Tokenizer
    path = resolve_source(source)
    if path.is_file():
        from .gguf import open_gguf
        from .gguf_tokenizer import gguf_tokenizer_files
        text, tok_cfg, gen_cfg = gguf_tokenizer_files(open_gguf(path))
        return Tokenizer(text, tok_cfg, gen_cfg, name=path.name)
    return Tokenizer.from_dir(path)
