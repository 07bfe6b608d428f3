"""Prompt caching: keep the keys and values of tokens already computed, and reuse the longest common prefix.

A chat's next turn repeats the whole conversation so far; a server sees the same long system prompt in many
requests. The keys and values of a token depend only on the tokens before it, so for the longest prefix a new
prompt shares with one computed before, they can be copied instead of recomputed, and only the rest of the
prompt is prefilled. RoPE rotates keys by their position before they are cached, and positions count a
sequence's own tokens from 0, so a prefix's keys are valid wherever its row sits on the engine's time axis.

- `PromptCache`: the tokens of one sequence and their keys/values (L, H_kv, n, D). Give it to a generation
  (`generate(..., prompt_cache=pc)`, `stream_text`, the chat command) and it is reused, then updated in place
  with the prompt and answer of that generation, ready for the next turn. `save` / `PromptCache.load` write and
  read a safetensors file (the tensors, the token ids and a fingerprint of the model in its metadata), as
  mlx-lm's prompt-cache files do (`mlx_lm.models.cache.save_prompt_cache`), so a long prefilled prefix
  (a system prompt, a document) can be computed once and shipped.
- `PrefixPool`: a bounded LRU of the prompt caches of recently finished sequences (the server keeps one),
  looked up by longest common prefix.

At least one prompt token is always recomputed: its logits give the first new token. Results are those of a
full prefill up to the rounding of a prefill split in two (tests/test_prompt_cache.py bounds it by the
cached-vs-full distance transformers itself shows).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import Qwen2PureError

# a shared prefix shorter than this is recomputed: copying it would save less than it costs to look up
MIN_REUSE = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    ta = torch.as_tensor(list(a[:n]), dtype=torch.long)
    tb = torch.as_tensor(list(b[:n]), dtype=torch.long)
    diff = (ta != tb).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


def model_fingerprint(model) -> dict:
    """What a cache's keys/values depend on beyond the tokens: the architecture sizes and the dtype."""
    c = model.config
    return {"num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "rope_theta": c.rope_theta, "dtype": str(model.dtype).replace("torch.", "")}


class PromptCache:
    """The tokens of one sequence and their keys/values: k, v (L, H_kv, n, D) in the model's dtype.

    An empty cache (`PromptCache()`) fills on first use. Reused by a generation for the longest common
    prefix with its prompt, then replaced by that generation's prompt and answer.
    """

    def __init__(self, tokens: Sequence[int] = (), k: Optional[torch.Tensor] = None,
                 v: Optional[torch.Tensor] = None, fingerprint: Optional[dict] = None):
        self.tokens = list(tokens)
        self.k, self.v = k, v
        self.fingerprint = fingerprint
        if (k is None) != (v is None) or (k is not None and (k.shape != v.shape or k.shape[2] != len(self.tokens))):
            raise Qwen2PureError(f"PromptCache: k/v of shapes {None if k is None else list(k.shape)} / "
                                 f"{None if v is None else list(v.shape)} do not hold {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def usable_for(self, model) -> bool:
        """Whether this cache was made by a model of the same sizes and dtype (else it is not reused)."""
        return self.k is not None and self.fingerprint == model_fingerprint(model) and self.k.device == model.device

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` this cache can supply (at most len(prompt) - 1)."""
        if self.k is None:
            return 0
        return min(common_prefix(self.tokens, prompt), len(prompt) - 1)

    def update(self, tokens: Sequence[int], k: torch.Tensor, v: torch.Tensor, fingerprint: dict) -> None:
        """Replace the contents (the engine calls this when a sequence using this cache finishes)."""
        self.tokens, self.k, self.v, self.fingerprint = list(tokens), k, v, fingerprint

    # ---- files ---------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to a safetensors file, atomically. Raises Qwen2PureError for an empty cache."""
        from safetensors.torch import save_file
        if self.k is None:
            raise Qwen2PureError("the prompt cache is empty: generate with it (or prefill it) before saving")
        path = Path(path)
        meta = {"format": "qwen2-pure-prompt-cache", "version": "1", "tokens": json.dumps(self.tokens),
                "model": json.dumps(self.fingerprint, sort_keys=True)}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file({"k": self.k.contiguous().cpu(), "v": self.v.contiguous().cpu()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "PromptCache":
        """Read a file written by `save`. With `model`, the cache must match it (sizes and dtype): a mismatch is
        a `Qwen2PureError` naming the file and the differing fields."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise Qwen2PureError(f"{path}: no such prompt-cache file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "qwen2-pure-prompt-cache":
                    raise Qwen2PureError(f"{path}: not a qwen2-pure prompt-cache file")
                k, v = f.get_tensor("k"), f.get_tensor("v")
            tokens, fingerprint = json.loads(meta["tokens"]), json.loads(meta["model"])
        except Qwen2PureError:
            raise
        except Exception as e:  # safetensors' own errors: truncated file, bad header
            raise Qwen2PureError(f"{path}: cannot read the prompt cache ({type(e).__name__}: {e})") from None
        if model is not None:
            want = model_fingerprint(model)
            wrong = {key: (fingerprint.get(key), value) for key, value in want.items() if fingerprint.get(key) != value}
            if wrong:
                raise Qwen2PureError(f"{path}: the prompt cache was made by another model or dtype: " + ", ".join(
                    f"{key} {a!r} (this model: {b!r})" for key, (a, b) in wrong.items()))
            k, v = k.to(model.device), v.to(model.device)
        return cls(tokens, k, v, fingerprint)


class PrefixPool:
    """The prompt caches of recently finished sequences, at most `max_bytes` of keys/values (LRU)."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise Qwen2PureError(f"max_bytes={max_bytes!r} is invalid: it must be an integer >= 0")
        self.max_bytes = max_bytes
        self.entries: "OrderedDict[int, PromptCache]" = OrderedDict()
        self._next = 0
        self.nbytes = 0

    def lookup(self, prompt: Sequence[int]) -> tuple[Optional[PromptCache], int]:
        """The entry sharing the longest prefix with `prompt` and that length (0 and None below MIN_REUSE)."""
        best, n = None, 0
        for key, entry in self.entries.items():
            m = entry.reusable(prompt)
            if m > n:
                best, n, best_key = entry, m, key
        if best is None or n < MIN_REUSE:
            return None, 0
        self.entries.move_to_end(best_key)
        return best, n

    def add(self, cache: PromptCache) -> None:
        """Keep `cache`; entries that are a prefix of it are dropped, then the least recently used beyond
        the byte budget."""
        if cache.k is None or cache.nbytes > self.max_bytes:
            return
        for key in [key for key, e in self.entries.items() if common_prefix(e.tokens, cache.tokens) == len(e)]:
            self.nbytes -= self.entries.pop(key).nbytes
        self.entries[self._next] = cache
        self._next += 1
        self.nbytes += cache.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self.entries.popitem(last=False)[1].nbytes

    def __len__(self) -> int:
        return len(self.entries)
