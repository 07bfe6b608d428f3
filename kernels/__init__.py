"""Triton kernels for Qwen2 (installed as `qwen2_pure.kernels`), each beside its PyTorch reference.

- `flash_attention`: prefill attention, FlashAttention-2 online softmax, GQA-native (the query heads of a
  group share every K/V tile), causal blocks above the diagonal skipped, key padding or an additive bias.
- `decode_attention`: one new token per sequence over a KV cache; split-KV (flash-decoding) + a reduction.
- `rms_norm` (optionally fused with the residual add), `rope_` (in place on q and k), `swiglu`.

Importing this package imports triton; only `qwen2_pure.ops` imports it, and only when a Triton path is taken.
On a CPU, set `TRITON_INTERPRET=1` before the import to run the kernels through Triton's interpreter.
"""

from .attention import flash_attention, flash_attention_reference
from .decode import decode_attention, decode_attention_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rope import rope_, rope_reference_
from .swiglu import swiglu, swiglu_reference
from ._common import INTERPRET

__all__ = ["flash_attention", "flash_attention_reference", "decode_attention", "decode_attention_reference",
           "rms_norm", "rms_norm_reference", "rope_", "rope_reference_", "swiglu", "swiglu_reference", "INTERPRET"]
