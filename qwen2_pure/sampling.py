"""Sampling: small pure functions over fp32 next-token logits `[B, V]`.

One decode step is

    logits = penalties.apply(logits, repetition_penalty=..., presence_penalty=..., frequency_penalty=...)
    logits = process_logits(logits, temperature=..., top_k=..., top_p=..., min_p=...)
    tokens = sample_next(logits, temperature=..., generators=...)
    penalties.update(tokens)  # -1 for rows that have finished

The order and the semantics are those of Hugging Face transformers' `generate()` (`_get_logits_processor`):
repetition penalty -> temperature -> top-k -> top-p -> min-p, then `multinomial(softmax)`; ties, boundaries and
`min_tokens_to_keep=1` follow transformers' warpers exactly, so the filtered distributions are equal. Additions:
temperature 0 means greedy (transformers raises and wants `do_sample=False`) — and so does any temperature below
`GREEDY_BELOW` = 1e-5, vLLM's rule (`_SAMPLING_EPS` in vllm/sampling_params.py): dividing by such a temperature
overflows fp32 —, logits made infinite by an extreme penalty saturate at the largest fp32 value instead of
turning the softmax into NaN, and OpenAI presence/frequency
penalties, applied after the repetition penalty over the generated tokens only (vLLM's place for them).

Other engines differ:
- vLLM v1: penalties -> temperature -> min-p -> top-k -> top-p, and an exponential-race draw instead of
  `multinomial`, so its seeded tokens differ from ours even where the filtered distributions agree.
- llama.cpp: penalties (last 64 tokens only) -> top-k -> typical -> top-p -> min-p -> temperature *last*, so its
  top-p/min-p cut the un-tempered distribution; its default top_k=40, top_p=0.95, min_p=0.05, temp=0.8.

Randomness comes from one `torch.Generator` per row (`make_generators`), so a row's tokens do not depend on the
other rows of its batch; with batch 1 on CPU the draw equals transformers' after `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from numbers import Real

import torch

from qwen2_pure.errors import Qwen2PureError

__all__ = [
    "GREEDY_BELOW",
    "PenaltyState",
    "SamplingParams",
    "is_greedy",
    "make_generators",
    "process_logits",
    "sample_next",
    "validate_sampling",
]


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise Qwen2PureError(f"{name}={value!r} is invalid: {name} must be {allowed}")


def validate_sampling(
    *,
    temperature,
    top_k,
    top_p,
    min_p,
    repetition_penalty,
    presence_penalty=0.0,
    frequency_penalty=0.0,
) -> None:
    """Raise `Qwen2PureError` naming the first argument outside its range (NaN is never in range)."""
    _check("temperature", temperature,
           _is_number(temperature) and math.isfinite(temperature) and temperature >= 0,
           "a finite number >= 0 (0 = greedy)")
    _check("top_k", top_k, isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0,
           "an integer >= 0 (0 = off)")
    _check("top_p", top_p, _is_number(top_p) and 0 < top_p <= 1, "a number in (0, 1] (1 = off)")
    _check("min_p", min_p, _is_number(min_p) and 0 <= min_p <= 1, "a number in [0, 1] (0 = off)")
    _check("repetition_penalty", repetition_penalty,
           _is_number(repetition_penalty) and math.isfinite(repetition_penalty) and repetition_penalty > 0,
           "a finite number > 0 (1 = off)")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        _check(name, value, _is_number(value) and -2 <= value <= 2, "a number in [-2, 2] (0 = off)")


# ----------------------------------------------------------------------------------------------------------------
# Penalties: repetition (transformers) and presence/frequency (OpenAI)


class PenaltyState:
    """Per-row token history for the penalties, kept as `[B, V]` tensors so a step costs O(B·V), no Python loops.

    - `in_prompt[b, v]`: id v occurs in row b's prompt. The repetition penalty hits every id that occurs in the
      prompt or in the generated tokens, once per id whatever its count (transformers' semantics).
    - `counts[b, v]`: how often row b has *generated* v. Presence and frequency penalties (OpenAI) see only these.

    Ids outside [0, V) are ignored: a prompt may hold ids the lm_head cannot produce (transformers drops them
    too), and `update` takes -1 for a row that has finished.
    """

    def __init__(self, prompts: list[list[int]], vocab_size: int, device=None):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        self.vocab_size = vocab_size
        batch = len(prompts)
        self.in_prompt = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(batch, vocab_size, dtype=torch.int32, device=device)
        rows = [b for b, prompt in enumerate(prompts) for _ in prompt]
        ids = [int(t) for prompt in prompts for t in prompt]
        if ids:
            rows_t = torch.tensor(rows, dtype=torch.long, device=device)
            ids_t = torch.tensor(ids, dtype=torch.long, device=device)
            keep = (ids_t >= 0) & (ids_t < vocab_size)
            self.in_prompt[rows_t[keep], ids_t[keep]] = True

    @property
    def batch_size(self) -> int:
        return self.in_prompt.shape[0]

    def update(self, tokens: torch.Tensor) -> None:
        """Record one generated token per row (`[B]` long); -1 (or any id outside [0, V)) records nothing."""
        if tokens.shape != (self.batch_size,):
            raise ValueError(f"PenaltyState.update: tokens must have shape ({self.batch_size},), "
                             f"got {tuple(tokens.shape)}")
        tokens = tokens.to(device=self.counts.device, dtype=torch.long)
        valid = (tokens >= 0) & (tokens < self.vocab_size)
        # Invalid rows add 0 at a clamped index, which keeps the scatter free of host syncs.
        index = tokens.clamp(0, self.vocab_size - 1).unsqueeze(1)
        self.counts.scatter_add_(1, index, valid.to(self.counts.dtype).unsqueeze(1))

    def apply(
        self,
        logits: torch.Tensor,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> torch.Tensor:
        """Penalised copy of `logits` `[B, V]`; the input itself comes back when every penalty is neutral.

        Repetition (transformers): for each id seen in prompt or output, `x < 0 ? x * p : x / p`.
        Then OpenAI: `x -= presence * (count > 0) + frequency * count` over the generated tokens.
        """
        if repetition_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0:
            return logits
        if logits.shape != self.in_prompt.shape:
            raise ValueError(f"PenaltyState.apply: logits must have shape {tuple(self.in_prompt.shape)} "
                             f"(batch, vocab_size), got {tuple(logits.shape)}")
        generated = self.counts > 0
        if repetition_penalty != 1.0:
            penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
            logits = torch.where(self.in_prompt | generated, penalised, logits)
        if presence_penalty != 0.0 or frequency_penalty != 0.0:
            logits = logits - (presence_penalty * generated.to(logits.dtype)
                               + frequency_penalty * self.counts.to(logits.dtype))
        return logits


# ----------------------------------------------------------------------------------------------------------------
# Warpers: temperature -> top-k -> top-p -> min-p, each a copy of the transformers warper's arithmetic


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    # Keep every logit >= the k-th largest: ties at the k-th value all survive, so more than k may remain.
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, -math.inf)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # The smallest set of most probable tokens whose mass is >= top_p: walking up from the least probable, drop a
    # token while the mass at or below it is <= 1 - top_p (fp32), and never drop the most probable one.
    # Same (unstable) sort as transformers, so ties at the boundary fall the same way.
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, -math.inf)


def _min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    # Drop tokens whose probability is < min_p * (probability of the most likely token); the top one always stays.
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return logits.masked_fill(remove, -math.inf)


# Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`): logits / 1e-40 is inf, and softmax(inf) is NaN.
GREEDY_BELOW = 1e-5
_FP32_MAX = torch.finfo(torch.float32).max


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` means greedy decoding: 0, or anything below GREEDY_BELOW (vLLM's rule)."""
    return temperature < GREEDY_BELOW


def process_logits(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Apply the sampling warpers to `[B, V]` logits; removed tokens become -inf. The input is never modified.

    A greedy temperature (`is_greedy`: 0 or below 1e-5) means greedy: the logits come back unchanged (argmax
    does not depend on the warpers). +inf logits (an extreme repetition penalty) saturate at the largest fp32
    value, so those tokens share the mass instead of making the softmax NaN; -inf (removed) stays -inf.
    Each warper runs only where transformers would run it: temperature != 1, top_k != 0, top_p < 1, min_p > 0.
    """
    validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=1.0)
    if is_greedy(temperature):
        return logits
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = logits.clamp(max=_FP32_MAX)
    if top_k != 0:
        logits = _top_k(logits, top_k)
    if top_p < 1.0:
        logits = _top_p(logits, top_p)
    if min_p > 0.0:
        logits = _min_p(logits, min_p)
    return logits


# ----------------------------------------------------------------------------------------------------------------
# Drawing the token


def _mix64(seed: int, row: int) -> int:
    """splitmix64 of (seed, row): a platform-independent seed for row >= 1, well apart from seed + 1, seed + 2."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1  # 63 bits: a valid seed on every torch version


def make_generators(seed: int | None, batch: int, device=None) -> list[torch.Generator] | None:
    """One generator per row, or None (use torch's global RNG) when seed is None.

    Row 0 is seeded with exactly `seed`, so batch 1 reproduces `torch.manual_seed(seed)`; row i >= 1 with a
    hash of (seed, i). A CUDA `device` gives CUDA generators, whose draws differ from the CPU ones.
    """
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise Qwen2PureError(f"seed={seed!r} is invalid: seed must be an integer or None")
    device = torch.device("cpu" if device is None else device)
    return [torch.Generator(device=device).manual_seed(seed if i == 0 else _mix64(seed, i)) for i in range(batch)]


def sample_next(logits: torch.Tensor, *, temperature: float,
                generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row, LongTensor `[B]`: argmax when the temperature is greedy (`is_greedy`), else
    `multinomial(softmax(logits))`.

    With generators, row i draws from `generators[i]` alone (batch-invariant); without, one draw over the batch
    from the global RNG, as transformers does. Raises `Qwen2PureError` naming the rows whose distribution is not
    finite (NaN logits from the model, or every token removed).
    """
    if is_greedy(temperature):
        nan = torch.isnan(logits).any(dim=-1)
        if bool(nan.any()):  # argmax would silently pick the NaN's index
            raise Qwen2PureError(f"cannot pick a token for row(s) {nan.nonzero().flatten().tolist()}: the logits are "
                                 "not finite (NaN)")
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    finite = torch.isfinite(probs).all(dim=-1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise Qwen2PureError(f"cannot sample row(s) {rows}: the next-token distribution is not finite (NaN logits, "
                             "or every token removed by the penalties and filters)")
    if generators is None:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"sample_next: {len(generators)} generators for a batch of {probs.shape[0]} rows")
    out = []
    for row, g in zip(probs, generators):
        # A generator samples on its own device; a CPU generator with CUDA logits moves that row to the CPU.
        out.append(torch.multinomial(row.to(g.device), num_samples=1, generator=g).to(probs.device))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# Parameters


# transformers' values for keys absent from generation_config.json (GenerationConfig._get_default_generation_params
# in 5.x). min_p has no default there: absent means the warper is off.
_HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                "repetition_penalty": 1.0}

# Keys of generation_config.json that change which token is drawn and that we do not implement.
_UNSUPPORTED_ACTIVE = {
    "typical_p": lambda v: v < 1.0,
    "epsilon_cutoff": lambda v: v > 0.0,
    "eta_cutoff": lambda v: v > 0.0,
    "top_h": lambda v: True,
    "no_repeat_ngram_size": lambda v: v > 0,
    "num_beams": lambda v: v > 1,
    "penalty_alpha": lambda v: v > 0,
}


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each token. Neutral defaults: greedy, no filtering, no penalties, global RNG."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    def validate(self) -> "SamplingParams":
        validate_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                          repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                          frequency_penalty=self.frequency_penalty)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise Qwen2PureError(f"seed={self.seed!r} is invalid: seed must be an integer or None")
        return self

    @classmethod
    def from_generation_config(cls, d: dict, **overrides) -> "SamplingParams":
        """Read a generation_config.json dict as transformers' `generate()` would, then apply overrides.

        Keys absent or null take transformers' defaults: do_sample=False, temperature=1.0, top_k=50, top_p=1.0,
        min_p off, repetition_penalty=1.0. So a config with do_sample=true and no top_k samples with top_k=50.
        do_sample false gives temperature 0 (greedy) whatever the file's temperature; the repetition penalty still
        applies, as in transformers. Overrides are field names; None values are ignored; an override of
        temperature > 0 turns sampling on with the file's (or the default) top_k/top_p/min_p.
        """
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise Qwen2PureError(f"unknown sampling parameter(s) {sorted(unknown)}; "
                                 f"known: {[f.name for f in fields(cls)]}")
        got = {k: (d.get(k) if d.get(k) is not None else default) for k, default in _HF_DEFAULTS.items()}
        ignored = [k for k, active in _UNSUPPORTED_ACTIVE.items() if d.get(k) is not None and active(d[k])]
        if ignored:
            warnings.warn(f"generation_config sets {', '.join(f'{k}={d[k]!r}' for k in ignored)}, which qwen2-pure "
                          "does not implement; ignored", stacklevel=2)
        as_float = lambda x: float(x) if _is_number(x) else x  # noqa: E731 (bad values reach validate())
        params = cls(
            temperature=as_float(got["temperature"]) if got["do_sample"] else 0.0,
            top_k=got["top_k"],
            top_p=as_float(got["top_p"]),
            min_p=as_float(got["min_p"]),
            repetition_penalty=as_float(got["repetition_penalty"]),
        )
        params = replace(params, **{k: v for k, v in overrides.items() if v is not None})
        return params.validate()
