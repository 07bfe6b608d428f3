"""Weight-only quantization of the linear layers: per-channel int8 and group-wise int4.

    model = q.load_model(path, quantize="int8")      # or "int4"; quantized tensor by tensor while loading
    quantize_model(model, "int4")                      # or after loading a float model
    quantization_of(model)                             # "int4": read off the layers, nothing is attached

Only the weights are quantized; activations, the KV cache, norms, the embedding table and the q/k/v
biases keep the model's dtype. Matrix products run on PyTorch's own CPU kernels for packed weights:

- int8: symmetric, one scale per output channel: w ≈ q · s, q in [-127, 127]. Decode-sized products
  (few rows) run `torch._weight_int8pack_mm`, which reads the int8 weight directly (1 byte a weight
  instead of 2 in bf16); prompt-sized products dequantize the weight once and run a dense GEMM, which
  is several times faster than the packed kernel when many rows share the weight.
- int4: asymmetric, one scale and one minimum per group of `group_size` (32) consecutive inputs of a
  row: w ≈ q · s + m, q in [0, 15] (the layout of llama.cpp's Q4_1 / the sub-blocks of Q4_K).
  Products run `torch._weight_int4pack_mm_for_cpu` on the weight in PyTorch's packed CPU layout
  (two 4-bit values a byte, tiled for its kernel), which computes in fp32 from bf16 activations.
- The output head is quantized too (it is a quarter of the 0.5B model's bytes); in int4 mode it gets
  int8, as llama.cpp's Q4_K_M keeps it at 6 bits: the logits are the most sensitive product.

The packed kernels take bf16 (or fp16) activations: a quantized float32 model casts the input of
each quantized product to bf16 and the output back, the way llama.cpp rounds activations to 8 bits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import Qwen2PureError

MODES = ("int8", "int4")
GROUP_SIZE = 32
CHUNK_BYTES = 16 << 20
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8)  # int4: the group ranges tried, as fractions of [min, max]
REFINE_STEPS = 3  # int4: least-squares refits of each group's scale and minimum after the range search
# rows (tokens) from which a dequantized dense GEMM beats the packed kernels
DENSE_FROM_ROWS = 16
# the linear layers quantized: every projection of the decoder, and the output head
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def check_mode(mode) -> Optional[str]:
    if mode is None or mode in ("none", ""):
        return None
    if mode not in MODES:
        raise Qwen2PureError(f"quantize={mode!r}: expected one of {', '.join(MODES)} (or None)")
    return mode


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


class QuantLinear(nn.Module):
    """A drop-in for `nn.Linear` holding an int8 or int4 weight; `bias` stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str,
                 group_size: int = GROUP_SIZE, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        mode = check_mode(mode)
        if mode == "int4" and not int4_fits(in_features, out_features, group_size):
            raise Qwen2PureError(f"int4 needs in_features ({in_features}) to be a multiple of group_size "
                                 f"({group_size}) and out_features ({out_features}) a multiple of 16")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        self.dtype = dtype  # the activation dtype this layer returns
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("qweight", None)
        self.register_buffer("scales", None)
        self.register_buffer("kernel_scales", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = GROUP_SIZE) -> "QuantLinear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, group_size,
                    dtype=w.dtype, device=w.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        layer.load_weight(w)
        return layer

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}{g}")

    # -- quantization ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight (out_features, in_features) into this layer's buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise Qwen2PureError(f"weight of shape {list(weight.shape)} for a quantized linear layer of "
                                 f"{[self.out_features, self.in_features]}")
        w = weight.detach()
        # row chunks of ~16 MB in fp32: the temporaries of quantizing stay small next to the weight itself
        step = max(16, (CHUNK_BYTES // (4 * self.in_features)) // 16 * 16)
        parts = [(quantize_int8 if self.mode == "int8" else lambda c: quantize_int4(c, self.group_size))(
            w[r:r + step].to(torch.float32)) for r in range(0, self.out_features, step)]
        values = [torch.cat(column) for column in zip(*parts)]
        if self.mode == "int8":
            self.qweight, self.scales = values
            # the kernel takes its scales in the activations' dtype: converted once here, not at each call
            # (inductor cannot lower the packed op on a scale tensor computed inside the graph)
            self.kernel_scales = self.scales.to(_kernel_dtype(self.dtype))
        else:
            self.load_int4(*values)

    @torch.no_grad()
    def load_int4(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> None:
        """Take int4 values as they are: q (N, K) in [0, 15], scale and minimum (N, K / group_size), for
        w = q * scale + minimum (e.g. a GGUF's Q4_0 / Q4_1 / Q4_K blocks, see loading.gguf)."""
        if self.mode != "int4" or tuple(q.shape) != (self.out_features, self.in_features) \
                or tuple(scale.shape) != (self.out_features, self.in_features // self.group_size):
            raise Qwen2PureError(f"int4 values of shape {list(q.shape)} / scales {list(scale.shape)} for a "
                                 f"{self.mode} layer of {[self.out_features, self.in_features]}, groups of {self.group_size}")
        self.qweight = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # the kernel's (groups, N, 2) table of scale and zero for w = (q - 8) * scale + zero
        s, m = scale.float(), minimum.float()
        self.scales = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).contiguous().to(_kernel_dtype(self.dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the kernels compute with, as a dense (out_features, in_features) tensor."""
        if self.mode == "int8":
            return (self.qweight.to(torch.float32) * self.scales[:, None]).to(dtype)
        # multiply an identity through the packed kernel: exact, and independent of the packed layout
        eye = torch.eye(self.in_features, dtype=self.scales.dtype, device=self.qweight.device)
        w_t = torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scales)
        return w_t.t().to(dtype)

    # -- products ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.mode == "int8" and x2.shape[0] >= DENSE_FROM_ROWS:
            out = F.linear(x2.to(torch.float32), self.dequantize(torch.float32))
        else:
            kd = _kernel_dtype(x.dtype)
            if self.mode == "int8":
                scales = self.kernel_scales if self.kernel_scales.dtype == kd else self.scales.to(kd)
                out = torch._weight_int8pack_mm(x2.to(kd), self.qweight, scales)
            else:
                out = torch._weight_int4pack_mm_for_cpu(x2.to(kd), self.qweight, self.group_size, self.scales)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scale fp32 (N,)) with w ≈ q * scale[:, None]."""
    amax = w.abs().amax(dim=1)
    scale = (amax / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4 bits: (q uint8 in [0, 15] (N, K), scale (N, G), min (N, G)), G = K / group_size,
    w ≈ q * scale + min per group. Each group's range is searched over a few shrink factors of its
    [min, max] for the least squared error (outliers otherwise stretch the 16 levels of a whole group), then
    refined by alternating least-squares fits of (scale, min) and of the levels, as llama.cpp's
    make_qkx quantizers do. The minimum then may end up above zero."""
    N, K = w.shape
    wg = w.view(N, K // group_size, group_size)
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True)  # the minimum is <= 0, as in llama.cpp
    shrinks = torch.tensor(SHRINKS, dtype=w.dtype, device=w.device)
    errors = []
    for f in SHRINKS:
        mn, s = lo * f, ((hi - lo) * (f / 15)).clamp(min=1e-10)
        d = torch.round((wg - mn) / s).clamp_(0, 15).mul_(s).add_(mn).sub_(wg)
        errors.append(d.square_().sum(-1))
    best_err, best = torch.stack(errors).min(0)
    factor = shrinks[best].unsqueeze(-1)  # (N, G, 1): the best shrink per group
    mn, s = lo * factor, ((hi - lo) * factor / 15).clamp(min=1e-10)
    q = torch.round((wg - mn) / s).clamp_(0, 15)
    best_err = best_err.unsqueeze(-1)
    for _ in range(REFINE_STEPS):
        # with the levels fixed, the least-squares scale and minimum of each group (a line fit of w on q),
        # then the levels again; a group keeps its previous fit unless the new one has a smaller error
        qm, wm = q.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
        var = (q - qm).square().mean(-1, keepdim=True)
        s2 = torch.where(var > 0, ((q - qm) * (wg - wm)).mean(-1, keepdim=True) / var.clamp(min=1e-12), s).clamp(min=1e-10)
        m2 = wm - s2 * qm
        q2 = torch.round((wg - m2) / s2).clamp_(0, 15)
        err2 = (q2 * s2 + m2 - wg).square().sum(-1, keepdim=True)
        better = err2 < best_err
        q, s, mn = torch.where(better, q2, q), torch.where(better, s2, s), torch.where(better, m2, mn)
        best_err = torch.minimum(err2, best_err)
    return q.to(torch.uint8).view(N, K), s.squeeze(-1), mn.squeeze(-1)


def quantizable(name: str) -> bool:
    return name.rpartition(".")[2] in TARGETS


def int4_fits(in_features: int, out_features: int, group_size: int = GROUP_SIZE) -> bool:
    """The packed int4 CPU kernel's constraints: whole groups along the input, output rows in tiles of 16."""
    return in_features % group_size == 0 and out_features % 16 == 0


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one between,
    whose v_proj and down_proj its Q4_K_M mix stores at 6 bits instead of 4."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mode_for(name: str, linear: nn.Linear, mode: str, n_layers: int, group_size: int = GROUP_SIZE) -> str:
    """The mode of one layer. int4 keeps at int8, as llama.cpp's Q4_K_M mix keeps at 6 bits or more: the output
    head, and v_proj and down_proj of the layers `more_bits` names; also int8 is any layer whose shape the
    int4 kernel cannot take."""
    if mode != "int4":
        return mode
    leaf = name.rpartition(".")[2]
    if leaf == "lm_head" or not int4_fits(linear.in_features, linear.out_features, group_size):
        return "int8"
    parts = name.split(".")
    if leaf in ("v_proj", "down_proj") and "layers" in parts and more_bits(int(parts[parts.index("layers") + 1]), n_layers):
        return "int8"
    return mode


def replace_linears(model: nn.Module, mode: str, make, group_size: int = GROUP_SIZE) -> dict[str, "QuantLinear"]:
    """Put `make(linear, layer_mode)` (a QuantLinear) in place of each target nn.Linear of the model; returns
    the new layers by name. Shared by `quantize_model` and the loader (which swaps empty layers on the meta
    device and fills them as the weights arrive)."""
    swapped = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and quantizable(name):
            parent, _, attr = name.rpartition(".")
            layer = make(module, mode_for(name, module, mode, model.config.num_hidden_layers, group_size))
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
            swapped[name] = layer
    return swapped


def quantization_of(model: nn.Module) -> Optional[str]:
    """How the model's linear layers are quantized, read off the layers: "int4" when any layer holds int4
    weights (int4 mode keeps a few at int8, see `mode_for`), "int8" when all quantized ones are int8, None when
    none is quantized."""
    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    return "int4" if "int4" in modes else "int8" if modes else None


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = GROUP_SIZE) -> nn.Module:
    """Replace the model's target nn.Linear layers by QuantLinear in place; returns the model.

    A tied output head gets its own quantized copy (the embedding table stays a float lookup)."""
    mode = check_mode(mode)
    if mode is not None:
        replace_linears(model, mode, lambda linear, kind: QuantLinear.from_linear(linear, kind, group_size), group_size)
    return model
