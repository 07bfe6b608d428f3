"""Which key slots each query slot may read, described by its structure rather than as a T x S tensor.

The model's rule (`attention_mask_4d`): query slot q reads key slot s iff s <= q (causal), s > q - window
(sliding window, when the layer has one) and s is a real token of the row (the (B, S) padding mask). A batch
that is left padded, or whose rows start later on the slot axis (the engine's), has each row's tokens in one
contiguous run that ends at the current slot, so the padding is a per-row first slot `kv_start` (B,).

The PyTorch reference reads the additive (B|1, 1, T, S) tensor, built by `attention_mask_4d` exactly as before;
the Triton kernels read the structure (causal flag, query slots, window, per-row start) and never see a T x S
tensor. A padding mask that is not one run per row (a hole in the middle) has no structure: `kv_start` is None
and the kernels get the dense bias, the only case that still needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class AttentionMask:
    slots: torch.Tensor  # (T,) the query slots (the model's input_pos)
    kv_len: int  # key slots [0, kv_len)
    window: Optional[int]  # sliding window (counts the current token), None = full attention
    padding: Optional[torch.Tensor]  # (B, >= kv_len), 1 for real tokens; None = every slot is real
    kv_start: Optional[torch.Tensor]  # (B,) int32 first real slot per row, when the padding is one run per row
    dtype: torch.dtype  # of the additive mask: the activations' (the model's h.dtype)
    build: Callable  # (slots, kv_len, padding, window, dtype) -> additive mask: the model's attention_mask_4d
    bias: Optional[torch.Tensor] = None  # the additive mask, prebuilt when the reference path will read it

    @property
    def structured(self) -> bool:
        """Whether causal + window + kv_start say everything the padding says."""
        return self.padding is None or self.kv_start is not None

    def additive(self) -> torch.Tensor:
        """The (B|1, 1, T, S) additive mask: 0 where visible, dtype-min elsewhere (the reference's input)."""
        if self.bias is not None:
            return self.bias
        return self.build(self.slots, self.kv_len, self.padding, self.window, self.dtype)


def run_starts(padding: torch.Tensor, slots: torch.Tensor, kv_len: int, check: bool) -> Optional[torch.Tensor]:
    """Each row's first real slot (B,) int32, if every row of `padding` is one run of ones from there up to
    the last query slot; None if some row is not (then only a dense mask expresses it).

    Slots after the last query slot are hidden by causality, so what the padding says there does not
    matter. `check` verifies the run shape, a host sync; without it (a compiled decode step, where the
    engine's rows are runs by construction) the runs are assumed.
    """
    real = padding[:, :kv_len] != 0  # (B, S)
    keys = torch.arange(kv_len, device=padding.device)
    first = torch.where(real.any(-1), real.int().argmax(-1), kv_len)  # (B,); a row with no real slot sees none
    if check:
        run = keys[None, :] >= first[:, None]
        ok = (run == real) | (keys[None, :] > slots.max())
        if not bool(ok.all()):
            return None
    return first.to(torch.int32)
