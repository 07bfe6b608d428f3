"""The llama.cpp inputs of benchmarks/e2e.py, made from the demo checkpoint's GGUF.

    python benchmarks/gguf_peers.py                  # both files; prints their paths
    python benchmarks/gguf_peers.py bf16             # only the bf16 GGUF (needs gguf, not llama_cpp)

- `<cache>/qwen2.5-coder-0.5b-instruct-bf16.gguf`: every tensor of the demo GGUF (Q5_0/Q8_0/Q4_K/Q6_K)
  dequantized with `gguf.quants.dequantize` and stored as BF16, except 1-D tensors (norms, biases) which
  stay F32 as llama.cpp's own converter keeps them; the same tensor names and every metadata key/value
  (tokenizer, chat template, ...) copied, `general.file_type` set to MOSTLY_BF16.
- `<cache>/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`: that bf16 file quantized by llama.cpp itself
  (`llama_cpp.llama_model_quantize`, ftype LLAMA_FTYPE_MOSTLY_Q4_K_M, default parameters).

Both go under `qwen2_pure.loading.demo.cache_dir()`, are written to a temporary name and renamed into place,
and are skipped when already present.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STEM = "qwen2.5-coder-0.5b-instruct"
# written by GGUFWriter itself (header counts, the architecture given to its constructor)
_WRITER_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
_LLAMA_FTYPE_MOSTLY_BF16 = 32  # llama.h `LLAMA_FTYPE_MOSTLY_BF16`, the value of general.file_type


def bf16_path() -> Path:
    from qwen2_pure.loading.demo import cache_dir
    return cache_dir() / f"{STEM}-bf16.gguf"


def q4_k_m_path() -> Path:
    from qwen2_pure.loading.demo import cache_dir
    return cache_dir() / f"{STEM}-q4_k_m.gguf"


def _tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp{os.getpid()}")


def write_bf16_gguf(src: Path, out: Path) -> Path:
    """Copy `src`'s metadata and tensors into `out`, tensors dequantized to BF16 (1-D ones to F32)."""
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as T, GGUFValueType as V

    from qwen2_pure.loading.gguf import open_gguf  # gguf.GGUFReader with the file checked first

    reader = open_gguf(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = _tmp_name(out)
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name in _WRITER_KEYS:
            continue
        value = field.contents()
        if name == "general.file_type":
            value = _LLAMA_FTYPE_MOSTLY_BF16
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == V.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    for t in reader.tensors:
        # dequantize gives the numpy shape (rows, cols), GGML's ne reversed, as the writer expects
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = [int(n) for n in reversed(t.shape.tolist())]
        data = data.reshape(shape)
        if len(shape) <= 1:
            writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=T.F32)
        else:
            # quantize gives the bytes (rows, 2·cols) as uint8; the writer derives the element shape from them
            writer.add_tensor(t.name, gguf.quants.quantize(data, T.BF16), raw_dtype=T.BF16)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        written = {t.name: t.shape.tolist() for t in gguf.GGUFReader(tmp).tensors}
        source = {t.name: t.shape.tolist() for t in reader.tensors}
        if written != source:
            bad = next(n for n in source if written.get(n) != source[n])
            raise RuntimeError(f"{tmp}: tensor {bad} was written with shape {written.get(bad)}, "
                               f"expected {source[bad]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_q4_k_m_gguf(src: Path, out: Path) -> Path:
    """Quantize `src` to Q4_K_M with llama.cpp's own quantizer (needs llama-cpp-python)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    tmp = _tmp_name(out)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {tmp}, Q4_K_M) returned {rc}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def make(which=("bf16", "q4_k_m"), log=sys.stderr) -> dict:
    """The requested files ({'bf16': path, 'q4_k_m': path}), made when missing. Q4_K_M needs the bf16 one."""
    paths = {}
    if "bf16" in which or "q4_k_m" in which:
        out = bf16_path()
        if not out.exists():
            from qwen2_pure.loading.demo import demo_gguf_path
            src = demo_gguf_path()
            print(f"writing {out} (every tensor of {src.name} dequantized to BF16) ...", file=log, flush=True)
            write_bf16_gguf(src, out)
        paths["bf16"] = out
    if "q4_k_m" in which:
        out = q4_k_m_path()
        if not out.exists():
            print(f"writing {out} (llama.cpp Q4_K_M of the bf16 GGUF) ...", file=log, flush=True)
            write_q4_k_m_gguf(paths["bf16"], out)
        paths["q4_k_m"] = out
    return {k: v for k, v in paths.items() if k in which}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = ("bf16", "q4_k_m")
    # no choices=: argparse (3.11) checks an empty or default nargs="*" list against them as one value and refuses it
    ap.add_argument("which", nargs="*", metavar="{bf16,q4_k_m}", help="which files (default: both)")
    args = ap.parse_args()
    for w in args.which:
        if w not in kinds:
            ap.error(f"argument which: invalid choice: {w!r} (choose from {', '.join(map(repr, kinds))})")
    which = tuple(args.which or kinds)
    if "q4_k_m" in which:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            ap.error("q4_k_m is made by llama.cpp's quantizer: pip install -e \".[bench]\" (llama-cpp-python), "
                     "or ask for the bf16 file alone: python benchmarks/gguf_peers.py bf16")
    for name, path in make(which).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
