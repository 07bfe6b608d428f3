"""Generation: prefill once, then one cached decode step per token; tokens in, tokens out.

`stream_generate` is the loop, a Python generator that yields one list per step (the new token of
each prompt, or None once that prompt has stopped); `generate` collects it. Prompts of different
lengths are left-padded into one batch with an attention mask, so every row decodes in the same
step; RoPE positions count real tokens only, so a row's tokens do not depend on its neighbours'
lengths. `stream_text` sits on top for a single prompt and yields UTF-8-safe text, honouring stop
strings. Nothing here knows about chat templates or front ends.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from .errors import Qwen2PureError
from .sampling import PenaltyState, make_generators, process_logits, sample_next, validate_sampling


def default_stop_ids(model) -> list[int]:
    """The model's eos ids: generation_config.json's `eos_token_id` (int or list), else config.json's."""
    eos = getattr(model, "generation_config", {}).get("eos_token_id")
    if eos is None:
        return model.config.eos_ids
    return [int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad_id(model) -> int:
    pad = getattr(model, "generation_config", {}).get("pad_token_id", model.config.pad_token_id)
    if pad is None:
        pad = (default_stop_ids(model) or [0])[0]
    return int(pad)


def _check_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts \
            or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise Qwen2PureError("prompts must be a non-empty list of token-id lists, e.g. [[9707, 11, 1879]]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise Qwen2PureError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not p:
            raise Qwen2PureError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise Qwen2PureError(f"prompt {i} contains token id {bad[0]!r}, outside the vocabulary [0, {vocab})")
        if len(p) >= context:
            raise Qwen2PureError(f"prompt {i} has {len(p)} tokens, longer than the model's context of {context} "
                                 "tokens (max_position_embeddings) less one for the answer")


@torch.inference_mode()
def stream_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: Optional[int] = None,
                    stop_token_ids: Optional[Sequence[int]] = None) -> Iterator[list[Optional[int]]]:
    """Yield, at each step, [new token of prompt i, or None if prompt i has stopped] for every prompt.

    A prompt stops after emitting one of `stop_token_ids` (None: the model's eos ids; []: never) or
    after `max_new_tokens`; generation also ends at the model's context length. Sampling follows
    transformers' order (repetition penalty, temperature, top-k, top-p, min-p); temperature 0 is greedy.
    With a seed, each prompt draws from its own generator, so results are reproducible and a prompt's
    tokens do not depend on the other prompts of the batch.
    """
    validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                      frequency_penalty=frequency_penalty)
    _check_prompts(model, prompts, max_new_tokens)
    stop = set(default_stop_ids(model) if stop_token_ids is None else (int(t) for t in stop_token_ids))
    device, B = model.device, len(prompts)
    lens = [len(p) for p in prompts]
    P = max(lens)
    total = min(P + max_new_tokens, model.config.max_position_embeddings)
    pad = _pad_id(model)

    # left padding: (B, P) ids and a (B, total) mask whose columns fill in as tokens are generated
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros((B, total), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, P - len(p):P] = 1
    ids, mask = ids.to(device), mask.to(device)
    mask_arg = None if min(lens) == P else mask  # no padding: the plain causal path

    step_fn = getattr(model, "decode_step", None)
    cache = model.new_cache(B, total)
    penalties = PenaltyState([list(p) for p in prompts], model.config.vocab_size, device=device)
    generators = make_generators(seed, B)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device)

    logits = model(ids, attention_mask=None if mask_arg is None else mask[:, :P], cache=cache,
                   input_pos=torch.arange(P, device=device), last_only=True)[:, -1].float()
    for step in range(total - P):
        logits = penalties.apply(logits, repetition_penalty, presence_penalty, frequency_penalty)
        logits = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        tokens = sample_next(logits, temperature=temperature, generators=generators)
        tokens = torch.where(finished, torch.full_like(tokens, -1), tokens)
        penalties.update(tokens)
        out = tokens.tolist()
        yield [None if t < 0 else t for t in out]
        finished |= torch.isin(tokens, stop_t)
        if bool(finished.all()) or step == total - P - 1:
            return
        slot = P + step
        mask[:, slot] = 1  # finished rows keep decoding pad tokens, as transformers does; nobody reads them
        feed = torch.where(tokens < 0, torch.full_like(tokens, pad), tokens)
        input_pos = torch.tensor([slot], device=device)
        if step_fn is not None:  # fixed shapes: compiled on CPU, a CUDA graph on CUDA (qwen2_pure.fast)
            logits = step_fn(feed[:, None], input_pos, None if mask_arg is None else mask, cache)
        else:
            logits = model(feed[:, None], attention_mask=None if mask_arg is None else mask[:, :slot + 1],
                           cache=cache, input_pos=input_pos, last_only=True)[:, -1].float()


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             seed: Optional[int] = None, stop_token_ids: Optional[Sequence[int]] = None,
             **penalties) -> list[list[int]]:
    """New token ids for each prompt (the stop token included when one was hit, as transformers does)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                seed=seed, stop_token_ids=stop_token_ids, **penalties):
        for row, tok in zip(out, step):
            if tok is not None:
                row.append(tok)
    return out


def stream_text(model, tokenizer, prompt, *, stop: Optional[Sequence[str]] = None,
                skip_special_tokens: bool = True, **sampling) -> Iterator[str]:
    """Yield the answer to one prompt (a string or token ids) as text, as soon as it is printable.

    Never yields half a UTF-8 character; stop strings end the answer and are not included.
    `sampling` takes the keyword arguments of `stream_generate`. `stream_text(...).close()` (or
    leaving the loop) stops the generation.
    """
    from .tokenizer import TextStream
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = TextStream(tokenizer, skip_special_tokens=skip_special_tokens, stop=list(stop or []))
    steps = stream_generate(model, [ids], **sampling)
    try:
        for (tok,) in steps:
            if tok is None:
                break
            piece = text.push(tok)
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.finish()
        if tail:
            yield tail
    finally:
        steps.close()
