"""The model's masks reach the Triton kernels as structure (qwen2_pure.masks): causal at the query slots, the
sliding window, each row's first real slot; no T x S tensor. Each case runs `ops.attention` with the model's
`AttentionMask` on the kernels and on the PyTorch reference (which reads the additive mask `attention_mask_4d`
builds) and judges the kernel by its distance to the float64 result, at most 4x the reference's
(`hf_utils.assert_within_reference`, as tests/test_kernels.py does). On a CPU the kernels run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are small.
"""

import pytest
import torch

from qwen2_pure import ops
from qwen2_pure.masks import AttentionMask, run_starts
from qwen2_pure.model import attention_mask_4d
from qwen2_pure.settings import Settings
from hf_utils import assert_within_reference

try:
    import qwen2_pure.kernels as K
except ImportError as e:
    K, _WHY = None, f"triton is not importable ({e})"
else:
    _WHY = "no GPU and TRITON_INTERPRET is not set"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(K is None or (DEVICE == "cpu" and not K.INTERPRET), reason=_WHY)
TORCH = Settings(fast=False, kernels="torch")
TRITON = Settings(fast=False, kernels="triton")


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def runs(B, S, starts):
    """(B, S) padding: row b real from slots[b] on (left padding / a row that starts later)."""
    keys = torch.arange(S)
    return (keys[None, :] >= torch.tensor(starts)[:, None]).long().to(DEVICE)


def model_mask(slots, kv_len, padding, window, dtype, check=True):
    starts = None if padding is None else run_starts(padding, slots, kv_len, check)
    return AttentionMask(slots, kv_len, window, padding, starts, dtype, attention_mask_4d)


def exact(q, k, v, visible):
    n = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(n, 1), v.double().repeat_interleave(n, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0) @ v


def compare(q, k, v, mask, what):
    """Kernel vs reference on the rows that see at least one key (a row that sees none: zeros from the kernel,
    an average from the reference; the model never reads those rows)."""
    with torch.no_grad():
        out = ops.attention(q, k, v, mask, q.shape[-1] ** -0.5, TRITON)
        ref = ops.attention(q.float(), k.float(), v.float(),
                            AttentionMask(mask.slots, mask.kv_len, mask.window, mask.padding, None,
                                          torch.float32, attention_mask_4d),
                            q.shape[-1] ** -0.5, TORCH).to(q.dtype)
    visible = attention_mask_4d(mask.slots, mask.kv_len, mask.padding, mask.window, torch.float32) == 0
    visible = visible.expand(q.shape[0], 1, q.shape[2], k.shape[2])
    seen = visible.any(-1, keepdim=True)
    assert not out.isnan().any(), f"{what}: NaN"
    assert (out.float().masked_fill(seen, 0) == 0).all(), f"{what}: a row that sees no key must be zeros"
    assert_within_reference(out.double().masked_fill(~seen, 0), exact(q, k, v, visible).masked_fill(~seen, 0),
                            ref.double().masked_fill(~seen, 0), exact(q, k, v, visible).masked_fill(~seen, 0),
                            what=what)


# (H_q, H_kv, T, first slot, kv_len, D, dtype, row starts or None, window or None)
PREFILL = [
    (14, 2, 64, 0, 64, 64, torch.float32, None, None),  # plain causal, G=7
    (8, 1, 17, 0, 17, 128, torch.float16, [0, 9], None),  # left padded, G=8
    (14, 2, 64, 0, 64, 64, torch.float32, [0, 40], None),  # padding past a whole tile
    (4, 2, 17, 47, 64, 64, torch.float32, [5, 30], None),  # a prefill continuing a cache, rows start later
    (14, 2, 64, 0, 64, 64, torch.float32, None, 20),  # sliding window
    (4, 4, 64, 0, 64, 64, torch.float16, [0, 13], 24),  # window and padding
    (4, 2, 17, 0, 33, 64, torch.float32, [0, 3], None),  # kv_len past the last query: causality hides it
]


@pytest.mark.parametrize("hq,hkv,T,first,S,D,dtype,starts,window", PREFILL,
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_prefill_structured(hq, hkv, T, first, S, D, dtype, starts, window):
    B = 2
    q = rand(B, hq, T, D, dtype=dtype, seed=0)
    k = rand(B, hkv, S, D, dtype=dtype, seed=1)
    v = rand(B, hkv, S, D, dtype=dtype, seed=2)
    slots = torch.arange(first, first + T, device=DEVICE)
    padding = None if starts is None else runs(B, S, starts)
    mask = model_mask(slots, S, padding, window, dtype)
    assert mask.structured
    compare(q, k, v, mask, "prefill")


# (H_q, H_kv, slot, cache length, row starts or None, window or None)
DECODE = [
    (14, 2, 40, 41, [0, 17], None),  # eager step: kv_len = slot + 1
    (8, 1, 40, 129, [3, 33], None),  # compiled step: kv_len = the whole cache
    (4, 2, 100, 129, None, 32),  # window
    (14, 2, 100, 129, [0, 80], 64),  # window and padding
]


@pytest.mark.parametrize("hq,hkv,slot,S,starts,window", DECODE, ids=lambda v: str(v).replace(" ", ""))
def test_decode_structured(hq, hkv, slot, S, starts, window):
    B, D = 2, 64
    q = rand(B, hq, 1, D, dtype=torch.float32, seed=0)
    k = rand(B, hkv, S, D, dtype=torch.float32, seed=1)
    v = rand(B, hkv, S, D, dtype=torch.float32, seed=2)
    padding = None if starts is None else runs(B, S, starts)
    mask = model_mask(torch.tensor([slot], device=DEVICE), S, padding, window, torch.float32, check=False)
    compare(q, k, v, mask, "decode")


def test_padding_with_a_hole_goes_dense():
    """A padding mask that is not one run per row has no structure: the kernels get the dense mask."""
    B, S = 2, 33
    padding = runs(B, S, [0, 4])
    padding[1, 10] = 0
    slots = torch.arange(S, device=DEVICE)
    assert run_starts(padding, slots, S, check=True) is None
    mask = model_mask(slots, S, padding, None, torch.float32)
    assert not mask.structured
    q, k, v = (rand(B, h, S, 64, dtype=torch.float32, seed=i) for i, h in enumerate((4, 2, 2)))
    compare(q, k, v, mask, "dense fallback")
    # zeros after the last query slot do not matter (causality hides them): still one run
    padding = runs(B, S, [0, 4])
    padding[:, 20:] = 0
    assert run_starts(padding, torch.arange(20, device=DEVICE), S, check=True).tolist() == [0, 4]
