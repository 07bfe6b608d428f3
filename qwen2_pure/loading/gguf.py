"""GGUF import: read a llama.cpp-format Qwen2 checkpoint as HF names, shapes and fp32 tensors.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", version, tensor and
key/value counts, typed key/value metadata (`general.architecture`, `qwen2.block_count`, the tokenizer's
vocabulary, ...), one info record per tensor (name, dims, ggml type, offset), then the aligned data section.

Three facts shape this module:
- GGUF lists a tensor's dims fastest-varying first, so a PyTorch `(out, in)` weight is stored as `[in, out]`:
  the PyTorch shape is the reversed GGUF dims.
- llama.cpp permutes q/k rows only for LLaMA-style models; for the qwen2 architecture the weights are stored
  in HF order, so the import is a rename plus dequantization (`gguf.quants.dequantize`, numpy).
- Weights are quantized per block (Q8_0: 32 values, K-quants: 256), so each tensor is dequantized on its own
  and handed out before the next is touched: peak memory is one fp32 tensor beyond whatever the caller keeps.

`open_gguf` turns every way a file can be wrong (missing, not GGUF, truncated, another architecture) into a
`Qwen2PureError` naming the file; `gguf_config` builds an HF `config.json` dict; `iter_gguf_tensors` yields
`(hf_name, fp32 tensor)`; `convert_gguf` writes an HF-layout folder that transformers can load.
"""

from __future__ import annotations

import inspect
import math
import mmap
import os
import re
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import torch

from ..config import Qwen2Config
from ..errors import Qwen2PureError
from ..safetensors_io import check_output_dir, write_folder, write_safetensors

if TYPE_CHECKING:
    import gguf as _gguf_mod

_INSTALL_HINT = 'pip install "qwen2-pure[gguf]"'
ARCH = "qwen2"

# GGUF block name -> HF module name, inside `model.layers.N.` (the `.weight`/`.bias` suffix is kept).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise Qwen2PureError(f"reading GGUF files needs the `gguf` package; run: {_INSTALL_HINT}") from None
    return gguf


# --------------------------------------------------------------------------------------------------------
# Opening a file


_reader_class = None


def _fast_reader_class():
    """`gguf.GGUFReader` with a faster private `_get`, when the installed version has the one we know.

    GGUFReader parses the header by slicing an `np.memmap`, whose Python-level `__array_finalize__` runs for
    every one of the ~600k slices a 150k-token vocabulary needs (12 s for the demo checkpoint). Slicing a plain
    ndarray view of the same map gives identical arrays 3-4x faster. If `_get`'s signature ever changes we
    fall back to the stock class.
    """
    global _reader_class
    cls = _gguf().GGUFReader
    if _reader_class is not None and issubclass(_reader_class, cls):
        return _reader_class
    try:
        params = list(inspect.signature(cls._get).parameters)
    except (AttributeError, TypeError, ValueError):
        params = None
    if params != ["self", "offset", "dtype", "count", "override_order"]:
        _reader_class = cls
        return cls

    class _FastGGUFReader(cls):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain_data")
            if plain is None:
                plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
            dt = np.dtype(dtype)
            count = int(count)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            if order == "I" or (order == "<" and sys.byteorder == "little"):
                return arr
            return arr.view(dt.newbyteorder(order))

    _FastGGUFReader.__name__ = _FastGGUFReader.__qualname__ = "GGUFReader"
    _reader_class = _FastGGUFReader
    return _FastGGUFReader


# One parsed reader, reused while the file is unchanged: `load_model` and `load_tokenizer` both open the
# same path, and parsing the demo checkpoint's header costs seconds. It keeps the file mapped and its
# parsed metadata (~130 MB for a 150k-token vocabulary) alive; `clear_gguf_cache()` lets both go.
_cached: tuple[tuple, Any] | None = None


def clear_gguf_cache() -> None:
    """Forget the reader `open_gguf` keeps for the last file it opened."""
    global _cached
    _cached = None


def open_gguf(path: str | os.PathLike) -> "_gguf_mod.GGUFReader":
    """Open and validate a GGUF file of the qwen2 architecture; every problem is a `Qwen2PureError`.

    Checks, in order: the file exists; it starts with the GGUF magic; the header parses and every tensor's
    data lies inside the file (else "truncated", naming the tensor and the byte counts); the file is
    little-endian; `general.architecture` is `qwen2`.
    """
    global _cached
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise Qwen2PureError(f"{path}: file not found") from None
    if path.is_dir():
        raise Qwen2PureError(f"{path}: is a directory, expected a .gguf file")
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    size = st.st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise Qwen2PureError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'; {size} bytes)")
    try:
        reader = _fast_reader_class()(path)
    except Exception as e:  # a damaged header fails in many ways inside GGUFReader
        problem = _scan_for_truncation(path, size)
        if problem:
            raise Qwen2PureError(f"{path}: {problem}") from None
        raise Qwen2PureError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None

    for t in reader.tensors:  # GGUFReader catches this today, but only as an opaque reshape error
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise Qwen2PureError(
                f"{path}: truncated GGUF file: tensor '{t.name}' occupies bytes {t.data_offset}..{end} "
                f"but the file has {size} bytes")
    if reader.byte_order != "I":
        raise Qwen2PureError(f"{path}: big-endian GGUF files are not supported (convert it on a little-endian "
                             f"machine with llama.cpp's gguf tools)")
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise Qwen2PureError(
            f"{path}: GGUF architecture is {arch!r} (general.architecture); qwen2-pure reads only {ARCH!r} "
            f"models (Qwen2, Qwen2.5, Qwen2.5-Coder)")
    reader.__dict__["_qwen2_pure_path"] = path
    _cached = (key, reader)
    return reader


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Short(Exception):
    pass


def _scan_for_truncation(path: Path, size: int) -> str | None:
    """Walk the GGUF header with bounds checks; say where a truncated or inconsistent file ends early.

    Runs only after GGUFReader failed, to turn its error (often an IndexError or a failed reshape) into
    one that names the key or tensor. Returns None when the layout is consistent.
    """
    gguf = _gguf()
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 0
        what = "the file header"

        def take(n: int, fmt: str | None = None):
            nonlocal pos
            if n < 0 or pos + n > size:
                raise _Short(f"{what} needs bytes {pos}..{pos + n} but the file has {size} bytes")
            start, pos = pos, pos + n
            return struct.unpack_from(fmt, buf, start)[0] if fmt else None

        def string() -> bytes:
            n = take(8, "<Q")
            start = pos
            take(n)
            return buf[start:start + n]

        def value(vtype: int, depth: int = 0):
            if vtype in _SCALAR_SIZES:
                return take(_SCALAR_SIZES[vtype], {4: "<I"}.get(vtype, f"<{_SCALAR_SIZES[vtype]}s"))
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY and depth < 8:
                itype, count = take(4, "<I"), take(8, "<Q")
                if itype in _SCALAR_SIZES:
                    take(count * _SCALAR_SIZES[itype])
                else:
                    if count * 8 > size - pos:  # every element needs at least 8 bytes
                        raise _Short(f"{what} declares {count} array elements (at least {count * 8} bytes) "
                                     f"from byte {pos} but the file has {size} bytes")
                    for _ in range(count):
                        value(itype, depth + 1)
                return None
            raise _Short(f"{what} has unknown value type {vtype}")

        try:
            take(4)
            version = take(4, "<I")
            if version not in (2, 3):
                return None
            n_tensors, n_kv = take(8, "<Q"), take(8, "<Q")
            alignment = 32
            for i in range(n_kv):
                what = f"metadata entry #{i}"
                key = string().decode("utf-8", "replace")
                what = f"metadata key '{key}'"
                v = value(take(4, "<I"))
                if key == "general.alignment" and isinstance(v, int) and v > 0:
                    alignment = v
            infos = []
            for i in range(n_tensors):
                what = f"tensor info #{i}"
                name = string().decode("utf-8", "replace")
                what = f"the info record of tensor '{name}'"
                n_dims = take(4, "<I")
                dims = [take(8, "<Q") for _ in range(n_dims)]
                infos.append((name, dims, take(4, "<I"), take(8, "<Q")))
        except _Short as e:
            return f"truncated GGUF file: the header ends early ({e})"
        data_start = -(-pos // alignment) * alignment
        for name, dims, ttype, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                return f"tensor '{name}' has unknown ggml type {ttype}"
            nbytes = math.prod(dims) * type_size // block
            begin = data_start + offset
            if begin + nbytes > size:
                shape = list(reversed(dims))
                return (f"truncated GGUF file: tensor '{name}' ({qtype.name}, shape {shape}) occupies bytes "
                        f"{begin}..{begin + nbytes} but the file has {size} bytes")
        return None
    finally:
        buf.close()


def _reader(path_or_reader) -> "_gguf_mod.GGUFReader":
    gguf = _gguf()
    if isinstance(path_or_reader, gguf.GGUFReader):
        arch = _field(path_or_reader, "general.architecture", None)
        if arch != ARCH:
            raise Qwen2PureError(f"{_name_of(path_or_reader)}: GGUF architecture is {arch!r} "
                                 f"(general.architecture); qwen2-pure reads only {ARCH!r} models")
        return path_or_reader
    return open_gguf(path_or_reader)


def _name_of(reader) -> str:
    """The file a reader came from, for error messages."""
    return str(reader.__dict__.get("_qwen2_pure_path") or getattr(reader.data, "filename", None) or "<gguf>")


_MISSING = object()


def _field(reader, key: str, default: Any = _MISSING) -> Any:
    """A metadata value as a Python scalar/str/list (float32 values rounded to their shortest repr,
    so an epsilon stored as float32 1e-6 reads back as 1e-06, not 9.99999997e-07)."""
    gguf = _gguf()
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise Qwen2PureError(f"{_name_of(reader)}: GGUF metadata key '{key}' is missing")
        return default
    VT = gguf.GGUFValueType

    def scalar(part, vtype):
        v = part[0]
        if vtype == VT.FLOAT32:
            return float(str(np.float32(v)))
        if vtype == VT.BOOL:
            return bool(v)
        return v.item()

    main = f.types[0]
    if main == VT.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if main == VT.ARRAY:
        sub = f.types[-1] if len(f.types) > 1 else None
        if sub == VT.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [scalar(f.parts[i], sub) for i in f.data]
    return scalar(f.parts[f.data[0]], main)


def _int_field(reader, key: str, default: Any = _MISSING) -> int:
    v = _field(reader, key, default)
    if v is None:
        return v
    if isinstance(v, list) or isinstance(v, (bool, str)) or int(v) != v:
        raise Qwen2PureError(f"{_name_of(reader)}: GGUF metadata '{key}' is {v!r}, expected one integer "
                             f"(per-layer values are not supported)")
    return int(v)


# --------------------------------------------------------------------------------------------------------
# Config


def _rope_scaling(reader) -> dict | None:
    """HF `rope_scaling` from `qwen2.rope.scaling.*` (or the legacy `qwen2.rope.scale_linear`)."""
    kind = _field(reader, f"{ARCH}.rope.scaling.type", None)
    factor = _field(reader, f"{ARCH}.rope.scaling.factor", None)
    legacy = _field(reader, f"{ARCH}.rope.scale_linear", None)
    if kind is None and legacy is not None and legacy != 1.0:
        kind, factor = "linear", legacy
    if kind in (None, "none"):
        return None
    if factor is None:
        raise Qwen2PureError(f"{_name_of(reader)}: rope scaling type {kind!r} without "
                             f"'{ARCH}.rope.scaling.factor'")
    if kind == "linear":
        return {"rope_type": "linear", "type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "type": "yarn", "factor": factor}
        orig = _field(reader, f"{ARCH}.rope.scaling.original_context_length", None)
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = _field(reader, f"{ARCH}.rope.scaling.{gguf_key}", None)
            if v is not None:
                out[hf_key] = v
        return out
    raise Qwen2PureError(f"{_name_of(reader)}: rope scaling type {kind!r} ('{ARCH}.rope.scaling.type') is not "
                         f"supported; expected none, linear or yarn")


def _tensor_map(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def gguf_config(path_or_reader) -> dict:
    """An HF `config.json` dict for a qwen2 GGUF (a path or an open `gguf.GGUFReader`), checked by `Qwen2Config`.

    This maps GGUF metadata keys to config.json keys and nothing more: what the values mean, their defaults
    and their consistency are `Qwen2Config`'s, the one interpreter the loader, inspect and this share.
    `vocab_size` is the row count of `token_embd.weight` (the padded embedding, larger than the tokenizer);
    the embeddings are tied exactly when the file has no separate `output.weight`.
    """
    return _config(_reader(path_or_reader))[0]


def _config(reader) -> tuple[dict, Qwen2Config]:
    where = _name_of(reader)
    hidden = _int_field(reader, f"{ARCH}.embedding_length")
    layers = _int_field(reader, f"{ARCH}.block_count")
    heads = _int_field(reader, f"{ARCH}.attention.head_count")
    tensors = _tensor_map(reader)
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise Qwen2PureError(f"{where}: GGUF tensor 'token_embd.weight' is missing")
    vocab = int(embd.shape[-1]) if len(embd.shape) == 2 else -1
    if vocab <= 0 or int(embd.shape[0]) != hidden:
        raise Qwen2PureError(f"{where}: tensor 'token_embd.weight' has GGUF dims {embd.shape.tolist()}, "
                             f"expected [{hidden}, vocab] (embedding_length {hidden})")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) > vocab:
        raise Qwen2PureError(f"{where}: the tokenizer has {len(tokens.data)} tokens but 'token_embd.weight' "
                             f"has only {vocab} rows")
    d = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": _int_field(reader, f"{ARCH}.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        # absent: Qwen2Config's reading, multi-head attention (llama.cpp's for a missing head_count_kv too)
        "num_key_value_heads": _int_field(reader, f"{ARCH}.attention.head_count_kv", None),
        "max_position_embeddings": _int_field(reader, f"{ARCH}.context_length"),
        "rms_norm_eps": _field(reader, f"{ARCH}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, f"{ARCH}.rope.freq_base", 10000.0),  # llama.cpp's default when absent
        "rope_scaling": _rope_scaling(reader),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _int_field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _int_field(reader, "tokenizer.ggml.eos_token_id", None),
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    cfg = Qwen2Config.from_dict(d, source=f"{where} (its metadata as config.json)")
    d["num_key_value_heads"] = cfg.num_key_value_heads  # config.json states it
    for key in (f"{ARCH}.attention.key_length", f"{ARCH}.attention.value_length", f"{ARCH}.rope.dimension_count"):
        v = _int_field(reader, key, None)
        if v is not None and v != cfg.head_dim:
            raise Qwen2PureError(f"{where}: '{key}' is {v} but embedding_length/head_count is {cfg.head_dim}; "
                                 f"qwen2 requires head_dim = hidden_size / num_attention_heads with full RoPE")
    return d, cfg


# --------------------------------------------------------------------------------------------------------
# Tensors


def gguf_to_hf_name(name: str) -> str | None:
    """The HF parameter name of a qwen2 GGUF tensor, or None when the name is not one we know."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _expected_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every HF parameter a Qwen2 checkpoint of this config holds, with its PyTorch shape."""
    H, I, V, D = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _squeezed(shape) -> list[int]:
    return [d for d in shape if d != 1]


def _plan(reader) -> list[tuple[Any, str, tuple[int, ...]]]:
    """(GGUF tensor, HF name, PyTorch shape) for every tensor in file order, all checked against the config."""
    where = _name_of(reader)
    config = _config(reader)[1]
    expected = _expected_shapes(config)
    plan, seen = [], set()
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise Qwen2PureError(f"{where}: unknown GGUF tensor '{t.name}' (GGUF dims {t.shape.tolist()}); "
                                 f"not part of a qwen2 model")
        if hf not in expected:
            raise Qwen2PureError(f"{where}: GGUF tensor '{t.name}' ({hf}) does not belong to a qwen2 model with "
                                 f"{config.num_hidden_layers} blocks")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        want = expected[hf]
        if shape != want:
            if math.prod(shape) == math.prod(want) and _squeezed(shape) == _squeezed(want):
                shape = want  # e.g. a bias stored as [n, 1]: same data, drop the unit dim
            else:
                raise Qwen2PureError(
                    f"{where}: GGUF tensor '{t.name}' ({hf}) has shape {list(shape)} (GGUF dims "
                    f"{t.shape.tolist()}), expected {list(want)} from the metadata")
        plan.append((t, hf, shape))
        seen.add(hf)
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise Qwen2PureError(f"{where}: tensors missing from the GGUF file: {', '.join(missing[:3])}{more}")
    return plan


def gguf_tensor_specs(path_or_reader) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, PyTorch shape) of every tensor, in file order, without dequantizing anything."""
    return [(hf, shape) for _, hf, shape in _plan(_reader(path_or_reader))]


_CHUNK_BYTES = 16 << 20


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return "gguf " + version("gguf")
    except Exception:
        return "gguf"


def _dequantize(reader, t, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor as a new fp32 torch tensor, dequantized in row chunks of about 16 MB.

    `gguf.quants.dequantize` builds its whole result as a list of pieces before concatenating them, so
    on a full tensor it briefly holds two fp32 copies (1.1 GB for the demo's 151936x896 lm_head). Feeding
    it a few rows at a time and copying each piece into the output keeps the overhead to one chunk.
    """
    gguf = _gguf()
    n = int(t.n_elements)
    out = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return out.reshape(shape)
    data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim else t.data.reshape(1, 1)
    rows = data.shape[0]
    per_row = n // rows
    dst = out.numpy().reshape(rows, per_row)
    step = max(1, _CHUNK_BYTES // (4 * per_row))
    for r0 in range(0, rows, step):
        try:
            piece = gguf.quants.dequantize(data[r0:r0 + step], t.tensor_type)
        except NotImplementedError:
            raise Qwen2PureError(
                f"{_name_of(reader)}: tensor '{t.name}' has ggml type {t.tensor_type.name}, which this gguf "
                f"package ({_gguf_version()}) cannot dequantize; try upgrading it") from None
        dst[r0:r0 + step] = piece.reshape(-1, per_row)
    return out.reshape(shape)


def _release(reader, t) -> None:
    """Drop the mapped pages of a tensor already dequantized, so the file does not pile up in RSS."""
    m = getattr(reader.data, "_mmap", None)
    if m is None or not hasattr(m, "madvise"):
        return
    start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    stop = int(t.data_offset) + int(t.n_bytes)
    try:
        m.madvise(mmap.MADV_DONTNEED, start, stop - start)
    except (OSError, ValueError, AttributeError):
        pass


def iter_gguf_tensors(path_or_reader, keep_int4=None) -> Iterator[tuple[str, object]]:
    """Yield `(hf_name, fp32 tensor)` in file order, dequantizing one tensor at a time.

    Every name and shape is checked before the first tensor is yielded, so a bad file fails up front.
    keep_int4: a predicate on HF names; a matrix it accepts whose blocks are 4-bit groups of 32 (INT4_TYPES)
    comes as `(hf_name, (q (N, K) uint8, scale (N, K/32), min (N, K/32)))`, not dequantized (see
    `decode_int4_blocks`; for load_model(..., quantize="int4")).
    """
    reader = _reader(path_or_reader)
    plan = _plan(reader)

    def gen():
        for t, hf, shape in plan:
            if keep_int4 is not None and t.tensor_type.name in INT4_TYPES and len(shape) == 2 and keep_int4(hf):
                block_bytes = _gguf().GGML_QUANT_SIZES[t.tensor_type][1]
                q, s, m = decode_int4_blocks(t.data.reshape(-1, block_bytes), t.tensor_type.name)
                n, k = shape
                tensor = (torch.from_numpy(q).reshape(n, k), torch.from_numpy(s).reshape(n, k // 32),
                          torch.from_numpy(m).reshape(n, k // 32))
            else:
                tensor = _dequantize(reader, t, shape)
            _release(reader, t)
            yield hf, tensor

    return gen()


# --------------------------------------------------------------------------------------------------------
# Conversion to an HF folder

def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True,
                 overwrite: bool = False, dtype="float32", generation_config: Optional[dict] = None) -> Path:
    """Dequantize a qwen2 GGUF into an HF-layout folder that transformers loads; returns `out_dir`.

    generation_config: what generation_config.json holds (default: the ids of the GGUF's metadata, which has
    no sampling values; the command line passes the demo's published defaults for the demo GGUF).

    dtype: of the written weights, a torch dtype or its config.json name (float32, bfloat16, float16;
    config.json's torch_dtype says which). float32 holds the dequantized values exactly; bfloat16 / float16
    halve the file but round most of them (a block's value is an f16 scale times a small integer: more
    significant bits than either type keeps).
    Writes config.json, model.safetensors (streamed one tensor at a time), tokenizer.json,
    tokenizer_config.json (with the chat template) and generation_config.json with
    `qwen2_pure.safetensors_io.write_folder`: `out_dir` is either absent, the old folder, or complete.
    An existing non-empty `out_dir` is an error unless `overwrite=True`.
    """
    from tqdm.auto import tqdm

    from .gguf_tokenizer import gguf_tokenizer_files

    src = Path(gguf_path)
    out = check_output_dir(out_dir, overwrite)
    # Everything that can fail on a bad input is checked before anything is written.
    reader = open_gguf(src)
    name = str(dtype).removeprefix("torch.")
    config, cfg = _config(reader)
    if name != cfg.torch_dtype:  # Qwen2Config says which names a config.json's torch_dtype may take
        try:
            Qwen2Config.from_dict({**config, "torch_dtype": name}, source="convert_gguf")
        except Qwen2PureError as e:
            raise Qwen2PureError(f"dtype={dtype!r} is not supported ({e})") from None
        config = {**config, "torch_dtype": name}
    dtype = getattr(torch, name)
    plan = _plan(reader)
    tokenizer_json, tokenizer_config, gguf_generation_config = gguf_tokenizer_files(reader)
    generation_config = gguf_generation_config if generation_config is None else generation_config
    metadata = {
        "format": "pt",
        "converted_by": "qwen2-pure convert_gguf",
        "source_gguf": src.name,
        "source_gguf_bytes": str(src.stat().st_size),
        "general.name": str(_field(reader, "general.name", "")),
        "general.architecture": ARCH,
    }

    def tensors():
        with tqdm(total=len(plan), unit="tensor", desc=f"converting {src.name}", disable=not progress) as bar:
            for t, hf, shape in plan:
                tensor = _dequantize(reader, t, shape).to(dtype)
                _release(reader, t)
                yield hf, tensor
                del tensor
                bar.update(1)

    specs = [(hf, dtype, shape) for _, hf, shape in plan]
    return write_folder(out, {
        "config.json": config,
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "generation_config.json": generation_config,
        "model.safetensors": lambda path: write_safetensors(path, specs, tensors(), metadata),
    }, overwrite=overwrite, what="converted model")


# --------------------------------------------------------------------------------------------------------
# 4-bit blocks kept as they are (load_model(..., quantize="int4"))

# ggml types whose blocks are groups of 32 four-bit values with a scale and a minimum each: they map exactly
# onto qwen2_pure.quant's int4 layout (w = q * scale + min, q in [0, 15], groups of 32)
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _f16(raw, at: int):
    import numpy as np
    return raw[:, at:at + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _nibbles(qs):
    """(n, 16) bytes -> (n, 32): the low nibbles are values 0..15 of the group, the high ones 16..31."""
    import numpy as np
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def decode_int4_blocks(raw, type_name: str):
    """Raw ggml blocks (n_blocks, bytes per block) -> (q uint8 (groups, 32), scale (groups,), min (groups,)),
    with w = q * scale + min for each group of 32 consecutive values (ggml's own dequantization, factored)."""
    import numpy as np
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if type_name == "Q4_0":  # 2-byte d, 16 bytes of nibbles: w = (q - 8) d
        d = _f16(raw, 0)
        return _nibbles(raw[:, 2:18]), d, -8 * d
    if type_name == "Q4_1":  # d, m, nibbles: w = q d + m
        return _nibbles(raw[:, 4:20]), _f16(raw, 0), _f16(raw, 2)
    if type_name == "Q4_K":  # 256 values: d, dmin, 12 bytes of 6-bit sub-scales and mins, 128 bytes of nibbles
        d, dmin = _f16(raw, 0), _f16(raw, 2)
        sc_raw = raw[:, 4:16].astype(np.uint8)
        sc = np.empty((raw.shape[0], 8), dtype=np.uint8)
        mn = np.empty((raw.shape[0], 8), dtype=np.uint8)
        sc[:, :4], mn[:, :4] = sc_raw[:, 0:4] & 63, sc_raw[:, 4:8] & 63
        sc[:, 4:] = (sc_raw[:, 8:12] & 15) | ((sc_raw[:, 0:4] >> 6) << 4)
        mn[:, 4:] = (sc_raw[:, 8:12] >> 4) | ((sc_raw[:, 4:8] >> 6) << 4)
        qs = raw[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 64 values: low nibbles first, then high
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block 2c = low, 2c + 1 = high
        scale = d[:, None] * sc.astype(np.float32)
        minimum = -dmin[:, None] * mn.astype(np.float32)
        return q.reshape(-1, 32), scale.reshape(-1), minimum.reshape(-1)
    raise ValueError(f"not a 4-bit block type: {type_name}")

