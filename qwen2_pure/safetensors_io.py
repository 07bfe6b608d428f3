"""The safetensors format, memory-mapped and strict, and files and folders written atomically.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
row-major data; offsets are relative to the end of the header.

We parse the header ourselves instead of calling `safetensors.safe_open` for two reasons:
- every inconsistency (a truncated file, a header that is not JSON, offsets that disagree with the
  shape) becomes an error naming the file and the tensor, before any data is touched;
- a tensor is a zero-copy view of the memory map; once the loader has copied it into the model we
  `madvise(DONTNEED)` its pages, so the page cache never adds a second copy of the weights to RSS.

Every writer here is atomic: a reader sees the old file (or folder) or the whole new one. `write_folder` is the
one way a folder is written — a model converted from a GGUF, a merged LoRA export, a training checkpoint.
This module sits below everything that reads or writes checkpoints (loading, LoRA adapters, training) and
imports nothing of the package but its errors.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Union

import torch

from .errors import Qwen2PureError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsFile:
    """One `.safetensors` file: `names()`, `shape(name)`, `get(name)` (a zero-copy view), `release(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise Qwen2PureError(f"{self.path}: file not found") from None
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise Qwen2PureError(f"{self.path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise Qwen2PureError(
                f"{self.path}: corrupt safetensors header (declares {n} header bytes, file has {size} bytes)")
        try:
            header = json.loads(self._file.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise Qwen2PureError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise Qwen2PureError(f"{self.path}: corrupt header entry for tensor '{name}' ({err!r})") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise Qwen2PureError(
                    f"{self.path}: tensor '{name}' has shape {list(shape)} {e['dtype']} ({nbytes} bytes) "
                    f"but its data_offsets span {end - begin} bytes")
            if end > data_len:
                raise Qwen2PureError(
                    f"{self.path}: truncated file: tensor '{name}' ends at byte {self._data_start + end} "
                    f"but the file has {size} bytes")
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        """A read-only zero-copy view of the tensor's bytes; copy it before the file is closed."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        import warnings
        with warnings.catch_warnings():  # the view is read-only; we only ever copy out of it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mmap, dtype=dtype, count=math.prod(shape),
                                    offset=self._data_start + begin)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop the pages of a tensor already copied out, so they stop counting in RSS."""
        _, _, begin, end = self._entries[name]
        page = mmap.PAGESIZE
        start = (self._data_start + begin) // page * page
        stop = self._data_start + end
        if stop > start and hasattr(self._mmap, "madvise"):
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive somewhere; the GC closes it later
                pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterator[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Stream tensors to a safetensors file, atomically.

    `specs` lists (name, dtype, shape) of every tensor in order, so the header can be written first;
    `tensors` then yields (name, tensor) in the same order, one at a time, so a converter never holds
    more than one tensor in memory. The file appears under `path` only when complete (temp + rename).
    """
    path = Path(path)
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for (name, dtype, shape), (got_name, t) in zip(specs, tensors, strict=True):
                if got_name != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"write_safetensors: got {got_name} {t.dtype} {list(t.shape)}, "
                                     f"header says {name} {dtype} {list(shape)}")
                t = t.detach().contiguous().cpu()
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).numpy()))  # no intermediate bytes copy
                del t  # let the converter free this tensor before producing the next one
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _create_beside(path: Path, suffix: str = ".tmp", directory: bool = False):
    """A new hidden, uniquely named file (returned as `(fd, path)`) or folder (its path) beside `path`.

    It gets the permissions of an ordinary open()/mkdir(), 0666/0777 less the umask, where tempfile's
    mkstemp/mkdtemp give 0600/0700: the temp is renamed into place, so its mode is the output's.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
                return tmp
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def temp_dir_beside(final: str | os.PathLike) -> Path:
    """An empty temp folder beside `final` (its parent must exist) for a writer to fill; `replace_dir` then
    renames it into place."""
    return _create_beside(Path(final), directory=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished folder `tmp` to `out`, replacing an existing `out` (the caller allowed it).

    Writers build a whole folder (a converted model, a merged export, a training checkpoint) in a temp
    folder beside its final place, then call this: readers see the old folder or the complete new one.
    """
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = _create_beside(out, suffix=".old", directory=True)
    old.rmdir()
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# what `write_folder` writes under a file name: text, bytes, JSON (a dict or list), a copy of an existing
# file (a path), or a function that writes the file at the path it is given (a safetensors stream, torch.save)
FileContent = Union[str, bytes, dict, list, os.PathLike, Callable[[Path], None]]


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """`out` as a Path, if a folder may be written there: absent, an empty folder, or (with `overwrite`) any
    folder. Writers call it before their slow part, so a refusal comes before minutes of work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Qwen2PureError(f"{out}: exists and is not a directory; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise Qwen2PureError(f"{out}: output folder exists and is not empty; pass overwrite=True (--overwrite) "
                             "to replace it")
    return out


def write_folder(out: str | os.PathLike, files: Mapping[str, FileContent], *, overwrite: bool = False,
                 what: str = "folder") -> Path:
    """Write `files` ({name: content}, see `FileContent`) as the folder `out`, atomically; returns `out`.

    The files are written, in order, into a temp folder beside `out`, which then replaces it (`replace_dir`):
    `out` is absent, the old folder or the complete new one, never a part. An existing non-empty `out` is an
    error unless `overwrite`. A failure to write is a `Qwen2PureError` naming `out` and `what` was written;
    the temp folder is removed whatever happens.
    """
    out = check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Qwen2PureError(f"{out.parent}: cannot create the parent folder of the {what} ({e})") from None
    tmp = temp_dir_beside(out)
    try:
        for name, content in files.items():
            path = tmp / name
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            elif isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, (dict, list)):
                path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            elif isinstance(content, os.PathLike):
                shutil.copyfile(content, path)  # the copy gets an ordinary new file's mode, not the source's
            else:
                content(path)
        replace_dir(tmp, out)
    except OSError as e:
        raise Qwen2PureError(f"{out}: cannot write the {what} ({e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
