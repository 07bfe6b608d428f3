"""Triton kernels for Qwen2 (installed as `qwen2_pure.kernels`); their references are `qwen2_pure.ops`.

- `flash_attention`: prefill attention, FlashAttention-2 online softmax, GQA-native (the query heads of a
  group share every K/V tile), causal blocks above the diagonal skipped, key padding or an additive bias.
- `decode_attention`: one new token per sequence over a KV cache; split-KV (flash-decoding) + a reduction.
- `rms_norm` (optionally fused with the residual add before it: `ops.add_rms_norm`), `rope_` (in place on q and
  k), `swiglu`.

Each kernel computes what the matching `qwen2_pure.ops` function computes with `Settings(kernels="torch")`, the
one PyTorch reference (tests/test_kernels.py compares them); this package holds no second reference.
Importing it imports triton; only `qwen2_pure.ops` imports it, and only when a Triton path is taken.
On a CPU, set `TRITON_INTERPRET=1` before the import to run the kernels through Triton's interpreter.
"""

from .attention import flash_attention
from .decode import decode_attention
from .rms_norm import rms_norm
from .rope import rope_
from .swiglu import swiglu
from ._common import INTERPRET

__all__ = ["flash_attention", "decode_attention", "rms_norm", "rope_", "swiglu", "INTERPRET"]
