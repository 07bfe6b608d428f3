"""A decode step with fixed shapes: compiled with torch.compile on CPU, replayed as a CUDA graph on CUDA.

    model = q.load_model(path, dtype="bfloat16", compile=True)   # Settings(compile=True)
    q.generate(model, [ids], max_new_tokens=128)                  # the engine's decode steps run compiled

A decode step computes one token per sequence. In the plain step the attention reads cache slots
[0, t + 1), a shape that changes every step. The compiled step passes `kv_len` = the cache's whole length:
the attention reads every slot, the ones after the query hidden by the causal mask (and by the attention
mask for slots no row owns), so each step has the same shapes and runs without waiting on the device:

- CPU: `torch.compile` (inductor) fuses the norms, RoPE, the SwiGLU product and the residual adds into
  a few C++ loops and calls the matrix products as before; Python runs once per step instead of once
  per op. The first generation pays the compilation (tens of seconds for the 0.5B model on 2 cores);
  the cache-length dimension is marked dynamic so other prompt lengths do not recompile; the engine pads
  the batch to a power of two (idle rows are masked), so each of 1, 2, 4, 8, ... is compiled once.
- CUDA: the step is captured into a CUDA graph per (cache, batch size) and replayed each step: one launch
  instead of hundreds.

One `DecodeStep` per model (`decode_step_for`), so the compiled code outlives a single generation. The
generation engine (`qwen2_pure.engine`) calls it when the model's settings say `compile=True`. The prefill
is not compiled: it runs once per prompt, with a shape that changes with every prompt.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from .cache import KVCache


def _step(model, ids, position_ids, input_pos, attention_mask, k, v):
    # k, v: the whole cache (L, rows, H_kv, S, D); the step's B sequences are rows 0..B-1. Slicing here, inside
    # the compiled function, keeps the inputs' shapes and strides the same whatever B is (no recompiles).
    B = ids.shape[0]
    cache = KVCache.wrap(k[:, :B], v[:, :B])
    logits = model(ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                   input_pos=input_pos, kv_len=k.shape[3], last_only=True)
    return logits[:, -1].float()


class DecodeStep:
    """`step(ids (B, 1), position_ids (B, 1), input_pos (1,), attention_mask (B, S) or None, cache)` -> logits
    (B, vocab) fp32 for the sequences in rows 0..B-1 of `cache` (the whole cache, S slots per row); the mask
    covers every slot (1 for tokens the row may read).

    `calls` counts the steps run compiled (or graphed), `compilations` the torch.compile builds: tests read them
    to prove the compiled step ran."""

    def __init__(self, model):
        self.model = model
        # a MoE layer picks its experts by value (a host sync): those models take the eager step
        self.eager = any(hasattr(layer.mlp, "experts") for layer in model.model.layers)
        self._compiled = None
        self._graphs: dict = {}  # CUDA: (cache pointer, batch, masked) -> (graph, static inputs, static output)
        self.calls = 0

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor, input_pos: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], cache: KVCache) -> torch.Tensor:
        if self.eager:
            return _step(self.model, ids, position_ids, input_pos, attention_mask, cache.k, cache.v)
        self.calls += 1
        if ids.is_cuda:
            return self._cuda_graph(ids, position_ids, input_pos, attention_mask, cache)
        if self._compiled is None:
            self._compiled = torch.compile(lambda *a: _step(self.model, *a), fullgraph=True, options=_cpu_options())
        # Only the slot dimension is dynamic; the engine pads the batch to a power of two, so a handful of
        # static batch sizes are compiled once each (fewer guards and recompiles than a dynamic batch, whose
        # kernels showed heap corruption here; that run also shared inductor's on-disk cache with an
        # ATEN_CPU_CAPABILITY=avx2 run, which alone corrupts, so the dynamic batch is not proven at fault).
        for t, dynamic, static in ((ids, (), (0,)), (position_ids, (), (0,)), (attention_mask, (1,), (0,)),
                                   (cache.k, (3,), (1,)), (cache.v, (3,), (1,))):
            if t is not None:
                for d in dynamic:
                    torch._dynamo.maybe_mark_dynamic(t, d)
                for d in static:
                    torch._dynamo.mark_static(t, d)
        return self._compiled(ids, position_ids, input_pos, attention_mask, cache.k, cache.v)

    def _cuda_graph(self, ids, position_ids, input_pos, attention_mask, cache):
        key = (cache.k.data_ptr(), tuple(ids.shape), cache.k.shape[3], attention_mask is None)
        if key not in self._graphs:
            if self._graphs and next(iter(self._graphs))[0] != key[0]:
                self._graphs.clear()  # a new cache: the old graphs point into freed buffers
            static = [ids.clone(), position_ids.clone(), input_pos.clone(),
                      None if attention_mask is None else attention_mask.clone()]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy inits)
                _step(self.model, *static, cache.k, cache.v)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _step(self.model, *static, cache.k, cache.v)
            self._graphs[key] = (graph, static, out)
            # the warm-up and the capture wrote this step's keys at input_pos: replaying below rewrites them
        graph, static, out = self._graphs[key]
        for buf, value in zip(static, (ids, position_ids, input_pos, attention_mask)):
            if buf is not None:
                buf.copy_(value)
        graph.replay()
        return out.clone()


def _cpu_options() -> dict:
    """Inductor's vector width, matched to the ATen kernels' CPU capability (256-bit loops when ATen runs AVX2,
    e.g. ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU). Kernels compiled under one capability must not be reused
    under another: inductor's on-disk cache does not key on it (tests/conftest.py keeps one per capability)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"cpp.simdlen": 256} if capability == "AVX2" else {}


_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decode_step_for(model) -> DecodeStep:
    """The model's one DecodeStep (created on first use, dropped with the model)."""
    step = _STEPS.get(model)
    if step is None:
        step = _STEPS[model] = DecodeStep(model)
    return step
