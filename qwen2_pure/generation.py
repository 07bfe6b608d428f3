"""Generation: prefill once, then one cached decode step per token; tokens in, tokens out.

`stream_generate` is the loop, a Python generator that yields one list per step (the new token of
each prompt, or None once that prompt has stopped); `generate` collects it. Both drive the one
generation engine (`qwen2_pure.engine`): prompts of different lengths are left-padded into one batch
with an attention mask, so every row decodes in the same step; RoPE positions count real tokens only, so
a row's tokens do not depend on its neighbours' lengths. `stream_text` sits on top for a single prompt
and yields UTF-8-safe text, honouring stop strings. Nothing here knows about chat templates or front ends.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from .engine import Engine
from .engine import Sequence as EngineSequence
from .errors import Qwen2PureError
from .prompt_cache import PromptCache
from .sampling import SamplingParams, make_generators
from .speculative import make_speculator


_SPECULATION = ("prompt_lookup_num_tokens", "assistant_model", "num_assistant_tokens")


def default_stop_ids(model) -> list[int]:
    """The model's eos ids: generation_config.json's `eos_token_id` (int or list), else config.json's."""
    return list(model.generation_config.eos_token_id)


def _check_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts \
            or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise Qwen2PureError("prompts must be a non-empty list of token-id lists, e.g. [[9707, 11, 1879]]")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
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


def _sequences(model, prompts, *, max_new_tokens, seed, stop_token_ids, stop=(), prompt_cache=None, **sampling):
    """The engine sequences of one `generate` call, and the cache length they need."""
    params = SamplingParams(**sampling).validate()
    _check_prompts(model, prompts, max_new_tokens)
    longest = max(len(p) for p in prompts)
    max_new = min(max_new_tokens, model.config.max_position_embeddings - longest)  # generation ends at the context
    generators = make_generators(seed, len(prompts)) if not params.greedy else None
    stop_ids = None if stop_token_ids is None else [int(t) for t in stop_token_ids]  # None: the engine's eos ids
    caches = prompt_cache if isinstance(prompt_cache, (list, tuple)) else [prompt_cache] * len(prompts)
    if len(caches) != len(prompts) or (prompt_cache is not None and len(prompts) > 1
                                       and not isinstance(prompt_cache, (list, tuple))):
        raise Qwen2PureError("prompt_cache: give one PromptCache per prompt (a list), or one for a single prompt")
    if not all(c is None or isinstance(c, PromptCache) for c in caches):
        raise Qwen2PureError("prompt_cache must be a qwen2_pure.PromptCache (or a list of them, one per prompt)")
    seqs = [EngineSequence(prompt=list(p), params=params, max_new_tokens=max_new, stop_token_ids=stop_ids,
                           stop=stop, generator=None if generators is None else generators[i], id=f"prompt {i}",
                           prompt_cache=caches[i])
            for i, p in enumerate(prompts)]
    return seqs, longest + max_new


def _raise_if_failed(outputs) -> None:
    for out in outputs:
        if out.error is not None:
            raise Qwen2PureError(f"{out.seq.id}: {out.error}")


@torch.inference_mode()
def stream_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: Optional[int] = None,
                    prompt_lookup_num_tokens: Optional[int] = None, assistant_model=None, num_assistant_tokens: int = 5,
                    stop_token_ids: Optional[Sequence[int]] = None,
                    prompt_cache=None) -> Iterator[list[Optional[int]]]:
    """Yield, at each step, [new token of prompt i, or None if prompt i has stopped] for every prompt.

    A prompt stops after emitting one of `stop_token_ids` (None: the model's eos ids; []: never) or
    after `max_new_tokens`; generation also ends at the model's context length. Sampling follows
    transformers' order (repetition penalty, temperature, top-k, top-p, min-p); temperature 0 (or below
    1e-5, vLLM's rule) is greedy. With a seed, each prompt draws from its own generator, so results are
    reproducible and a prompt's tokens do not depend on the other prompts of the batch.
    prompt_cache: a `PromptCache` (one prompt) or a list of them (one per prompt): the longest prefix a
    prompt shares with its cache is not recomputed, and the cache then holds that prompt and its answer
    (`qwen2_pure.prompt_cache`; the chat command reuses one this way from turn to turn).
    Speculative decoding (transformers' names; `qwen2_pure.speculative`), while one prompt runs:
    prompt_lookup_num_tokens=N guesses up to N tokens by copying what followed the last 2-gram earlier in the
    text; assistant_model=draft (a smaller model of the same tokenizer) guesses `num_assistant_tokens`. The
    model checks the guesses in one forward; greedy tokens are those of plain decoding, sampled ones follow
    the model's distribution. Such a step yields one list per token it emits.
    Raises `Qwen2PureError` naming the argument at fault, or the prompt whose generation failed.
    """
    seqs, max_len = _sequences(model, prompts, max_new_tokens=max_new_tokens, seed=seed,
                               stop_token_ids=stop_token_ids, temperature=temperature, top_k=top_k, top_p=top_p,
                               min_p=min_p, repetition_penalty=repetition_penalty,
                               presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                               prompt_cache=prompt_cache)
    speculator = make_speculator(prompt_lookup_num_tokens=prompt_lookup_num_tokens, assistant_model=assistant_model,
                                 num_assistant_tokens=num_assistant_tokens)
    engine = Engine(model, max_batch=len(seqs), max_seq_len=max_len, speculator=speculator)
    outputs = engine.add(seqs)
    while True:
        _raise_if_failed(outputs)
        yield from _steps(outputs, seqs)
        if not engine.rows:
            return
        outputs = engine.step()


def _steps(outputs, seqs) -> list[list[Optional[int]]]:
    """One engine call's outputs as `stream_generate` steps: a list per token of a sequence (a speculative
    step emits several for its one sequence), and always at least one list."""
    steps: list[dict] = [{}]
    for out in outputs:
        i = 0
        while id(out.seq) in steps[i]:
            i += 1
            if i == len(steps):
                steps.append({})
        steps[i][id(out.seq)] = out.token
    return [[step.get(id(s)) for s in seqs] for step in steps]


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             seed: Optional[int] = None, stop_token_ids: Optional[Sequence[int]] = None,
             **penalties) -> list[list[int]]:
    """New token ids for each prompt (the stop token included when one was hit, as transformers does).
    `penalties` takes stream_generate's other keyword arguments (presence/frequency penalties, speculation)."""
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
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    max_new_tokens = sampling.pop("max_new_tokens", None)
    if max_new_tokens is None:
        raise Qwen2PureError("stream_text needs max_new_tokens")
    seed, stop_token_ids = sampling.pop("seed", None), sampling.pop("stop_token_ids", None)
    speculator = make_speculator(**{k: sampling.pop(k) for k in _SPECULATION if k in sampling})
    with torch.inference_mode():
        [seq], max_len = _sequences(model, [ids], max_new_tokens=max_new_tokens, seed=seed,
                                    stop_token_ids=stop_token_ids, stop=list(stop or []), **sampling)
        seq.skip_special_tokens = skip_special_tokens
        engine = Engine(model, max_batch=1, max_seq_len=max_len, tokenizer=tokenizer, speculator=speculator)
        outputs = engine.add([seq])
    while True:
        _raise_if_failed(outputs)
        for out in outputs:
            if out.text:
                yield out.text
        if not engine.rows:
            return
        with torch.inference_mode():
            outputs = engine.step()
