"""The static KV cache: preallocated buffers, written at slots.

One (L, B, H_kv, T_max, D) tensor for keys and one for values, allocated once per generation. A
forward pass writes its new keys at the slots `input_pos` and attends over slots [0, last + 1). The
same code path serves the prefill (input_pos = 0..T-1) and each decode step (input_pos = [t]), and
nothing is reallocated while generating, which is what lets a decode step be compiled or captured.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """A cache over existing (L, B, H_kv, T_max, D) buffers (no copy)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len = k, v, k.shape[3]
        return cache

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Store k, v (B, H_kv, T, D) at slots input_pos (T,); return the keys/values of slots [0, kv_len)."""
        if kv_len > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} slots, {kv_len} were asked for")
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        if kv_len == self.max_len:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
