"""Export: a base checkpoint and a LoRA adapter, merged, written as an HF-layout model folder.

This sits above both loading (which reads the base and applies the adapter) and `qwen2_pure.lora` (which merges);
`lora` itself never imports loading. The folder is written by `qwen2_pure.safetensors_io.write_folder`, the
writer `convert_gguf` and the training checkpoints use too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from ..errors import read_json_object
from ..lora import merge_lora
from ..safetensors_io import check_output_dir, write_folder, write_safetensors
from . import load_model, resolve_source

# the files of a model folder that an export carries over from its source unchanged
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "generation_config.json", "chat_template.jinja", "LICENSE")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_merged(source, adapter: Union[str, os.PathLike], output: Union[str, os.PathLike], dtype=None,
                  overwrite: bool = False) -> Path:
    """Load `source` + `adapter`, merge, and write an HF-layout folder that transformers and `load_model` read.

    Writes config.json (its torch_dtype set to the written dtype), model.safetensors, and the source's
    tokenizer files and generation_config.json (from the metadata, for a GGUF source), atomically: `output` is
    absent, the old folder or the complete new one. An existing non-empty `output` is an error unless `overwrite`.
    """
    out = check_output_dir(output, overwrite)  # before minutes of loading
    src = resolve_source(source)
    model = merge_lora(load_model(src, dtype=dtype, adapter=adapter))
    dtype_name = _DTYPE_NAMES[model.dtype]
    if src.is_file():  # a GGUF: its config and tokenizer come from the metadata
        from .gguf import gguf_config, open_gguf
        from .gguf_tokenizer import gguf_tokenizer_files
        reader = open_gguf(src)
        config = gguf_config(reader)
        tok_json, tok_cfg, gen_cfg = gguf_tokenizer_files(reader)
        # the generation config the model was loaded with (the demo's sampling defaults, not just the ids)
        sources = {"tokenizer.json": tok_json, "tokenizer_config.json": tok_cfg,
                   "generation_config.json": model.generation_config.raw or gen_cfg}
    else:
        config = read_json_object(src / "config.json")
        sources = {name: src / name for name in SOURCE_FILES if (src / name).is_file()}
    config["dtype" if "dtype" in config else "torch_dtype"] = dtype_name  # keep the source's spelling
    if "dtype" in config and "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config["tie_word_embeddings"] = model.config.tie_word_embeddings  # False once a LoRA on a tied head merged
    tied = model.config.tie_word_embeddings
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
             and not k.endswith("rotary_emb.inv_freq")}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    meta = {"format": "pt", "merged_by": "qwen2-pure export", "adapter": Path(adapter).name}
    files = {"config.json": config, **sources,
             "model.safetensors": lambda path: write_safetensors(path, specs, iter(state.items()), meta)}
    return write_folder(out, files, overwrite=overwrite, what="merged model")
