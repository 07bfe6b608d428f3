"""How a model computes: the choices made once, when it is loaded, instead of at every op.

    settings = Settings(fast=True, kernels="auto", compile=False)   # the library's defaults
    model = q.load_model(path, settings=settings)                    # or model.configure(settings)

- `fast`: the fast CPU paths of `qwen2_pure.ops` — PyTorch's fused attention (SDPA) and, on CPUs without
  bf16 instructions, fp32 GEMMs for prompt-sized bf16/fp16 products. `False` keeps transformers' eager op
  order everywhere, which is what makes fp32 logits bit-identical to its eager attention.
- `kernels`: "auto" runs the Triton kernels (`qwen2_pure.kernels`) on CUDA tensors and the PyTorch
  references elsewhere; "torch" forces the references; "triton" forces the kernels on any device (on a CPU
  through Triton's interpreter, `TRITON_INTERPRET=1`, for tests). Asking for kernels that cannot be imported
  is an error ("triton") or a one-time warning ("auto" on CUDA), never a silent fallback.
- `compile`: the decode step runs compiled (torch.compile on CPU, a CUDA graph on CUDA; `qwen2_pure.fast`).

The environment variables `QWEN2_PURE_FAST` (0/1), `QWEN2_PURE_KERNELS` (auto/torch/triton) and
`QWEN2_PURE_COMPILE` (0/1) are read only by `Settings.from_env`, which the entry points (`load_model`, the
command line) use for their defaults; nothing below them reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from .errors import Qwen2PureError

KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Settings:
    fast: bool = True
    kernels: str = "auto"
    compile: bool = False

    def __post_init__(self):
        for name in ("fast", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise Qwen2PureError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False")
        if self.kernels not in KERNEL_CHOICES:
            raise Qwen2PureError(f"kernels={self.kernels!r} is invalid: it must be one of {', '.join(KERNEL_CHOICES)}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> "Settings":
        """The defaults, changed by QWEN2_PURE_FAST / _KERNELS / _COMPILE where set, then by `overrides`
        (None values ignored). A malformed variable raises `Qwen2PureError` naming it."""
        env = os.environ if environ is None else environ
        values = {}
        for field, var in (("fast", "QWEN2_PURE_FAST"), ("compile", "QWEN2_PURE_COMPILE")):
            raw = env.get(var, "").strip()
            if raw:
                if raw not in ("0", "1"):
                    raise Qwen2PureError(f"{var}={raw!r}: expected 0 or 1")
                values[field] = raw == "1"
        raw = env.get("QWEN2_PURE_KERNELS", "").strip().lower()
        if raw:
            if raw not in KERNEL_CHOICES:
                raise Qwen2PureError(f"QWEN2_PURE_KERNELS={raw!r}: expected one of {', '.join(KERNEL_CHOICES)}")
            values["kernels"] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return replace(self, **changes)


DEFAULT = Settings()
