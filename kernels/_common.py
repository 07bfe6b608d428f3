"""What every kernel module shares: whether Triton is interpreting, and the autotune configs that follow.

`TRITON_INTERPRET=1` is read by Triton when a kernel is *decorated*, i.e. when these modules are imported,
so it is read here at the same moment. Under the interpreter (CPU) every kernel gets a single config,
because the autotuner benchmarks several configs through a GPU driver that does not exist there.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(gpu_configs: list, single_config, key: list):
    """triton.autotune over `gpu_configs` on a GPU; over `single_config` alone when interpreting, or when
    QWEN2_PURE_AUTOTUNE=0 (GPU test runs: tuning every test shape would cost more than the tests)."""
    single = INTERPRET or os.environ.get("QWEN2_PURE_AUTOTUNE", "1") == "0"
    return triton.autotune(configs=[single_config] if single else gpu_configs, key=key)


def upcast(dtype: torch.dtype) -> bool:
    # The interpreter runs bf16 arithmetic (dot, add, sum) on the raw uint16 bits: garbage. Loads and
    # casts are right, so interpreted bf16 kernels convert every load to fp32 first.
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full IEEE products (a GPU defaults to TF32, 1e-3 off the reference); others: the default
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two bucket, so a new prompt length does not re-tune."""
    return next_pow2(max(int(n), 1))
