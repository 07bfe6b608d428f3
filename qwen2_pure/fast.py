"""A decode step with fixed shapes: compiled with torch.compile on CPU, replayed as a CUDA graph on CUDA.

    model = q.load_model(path, dtype="bfloat16", compile=True)   # or enable_compile(model)
    q.generate(model, [ids], max_new_tokens=128)                  # the decode steps run compiled

A decode step computes one token per sequence. In the plain forward its attention reads cache slots
[0, t], a shape that changes every step, and finding t reads a tensor's value. The static step
(`model(..., static=True)`) reads every slot of the cache with the unwritten ones masked, so each step
has the same shapes and runs without waiting on the device:

- CPU: `torch.compile` (inductor) fuses the norms, RoPE, the SwiGLU product and the residual adds into
  a few C++ loops and calls the matrix products as before; Python runs once per step instead of once
  per op. The first generation pays the compilation (tens of seconds for the 0.5B model on 2 cores);
  the cache length dimension is marked dynamic so other prompt lengths do not recompile.
- CUDA: the whole step is captured once per generation into a CUDA graph (static input buffers, the
  cache tensors fixed for that generation) and replayed each step: one launch instead of hundreds.

`QWEN2_PURE_COMPILE=0` turns both off (the eager step runs), e.g. to debug. The prefill is not
compiled: it runs once per prompt, with a shape that changes with every prompt.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .cache import KVCache


def compile_enabled() -> bool:
    value = os.environ.get("QWEN2_PURE_COMPILE", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"QWEN2_PURE_COMPILE={value!r}: expected 0 or 1")
    return value == "1"


def _step(model, ids, input_pos, attention_mask, k, v):
    cache = KVCache.wrap(k, v)
    logits = model(ids, attention_mask=attention_mask, cache=cache, input_pos=input_pos, last_only=True,
                   static=True)
    return logits[:, -1].float()


class DecodeStep:
    """`step(ids (B, 1), input_pos (1,), attention_mask (B, S) or None, cache)` -> logits (B, vocab) fp32.

    attention_mask, when given, covers every slot of the cache (1 for real tokens, 0 for padding and
    for slots not written yet)."""

    def __init__(self, model):
        self.model = model
        # a MoE layer picks its experts by value (a host sync): those models take the eager step
        self.eager = any(hasattr(layer.mlp, "experts") for layer in model.model.layers)
        self._compiled = None
        self._marked = None  # the cache buffer whose slot dimension was last marked dynamic
        self._graph = None  # (key, graph, static inputs, static output) on CUDA

    def __call__(self, ids: torch.Tensor, input_pos: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 cache: KVCache) -> torch.Tensor:
        if self.eager or not compile_enabled():
            return _step(self.model, ids, input_pos, attention_mask, cache.k, cache.v)
        if ids.is_cuda:
            return self._cuda_graph(ids, input_pos, attention_mask, cache)
        if self._compiled is None:
            self._compiled = torch.compile(lambda *a: _step(self.model, *a), fullgraph=True)
        if self._marked is not cache.k:  # once per generation (a new cache, and its mask), not every step
            torch._dynamo.mark_dynamic(cache.k, 3)  # the slot dimension of (L, B, H_kv, S, D)
            torch._dynamo.mark_dynamic(cache.v, 3)
            if attention_mask is not None:
                torch._dynamo.mark_dynamic(attention_mask, 1)
            self._marked = cache.k
        return self._compiled(ids, input_pos, attention_mask, cache.k, cache.v)

    def _cuda_graph(self, ids, input_pos, attention_mask, cache):
        key = (cache.k.data_ptr(), tuple(ids.shape), attention_mask is None)
        if self._graph is None or self._graph[0] != key:
            static = [ids.clone(), input_pos.clone(), None if attention_mask is None else attention_mask.clone()]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy inits)
                _step(self.model, *static, cache.k, cache.v)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _step(self.model, *static, cache.k, cache.v)
            self._graph = (key, graph, static, out)
            # the warm-up and the capture wrote this step's keys at input_pos: replaying below rewrites them
        _, graph, static, out = self._graph
        static[0].copy_(ids)
        static[1].copy_(input_pos)
        if attention_mask is not None:
            static[2].copy_(attention_mask)
        graph.replay()
        return out.clone()


def enable_compile(model) -> None:
    """Make generation run the model's decode steps through a `DecodeStep` (see the module docstring)."""
    model.decode_step = DecodeStep(model)


def disable_compile(model) -> None:
    model.decode_step = None
