"""Constrained decoding: a grammar (a JSON schema, a Lark grammar) as a logits processor of `engine.Sequence`.

The grammar engine is llguidance (guidance-ai/llguidance: an Earley parser over a lazy regex lexer that walks
a token trie for each mask). It was picked over xgrammar and outlines-core by measuring all three on the real
Qwen2.5 vocabulary (benchmarks/grammar_mask.py, figures in benchmarks/RESULTS.md): its time to the first mask
of a new schema is 1-13 ms where xgrammar compiles for about 60 ms and outlines-core builds its index for 1 s
to 29 s; a mask costs about 0.1 ms, 0.3 ms applied to the logits, nothing beside a decode step; it reads
tokenizer.json itself (no transformers), keeps tokenizer.json's special tokens (`<|im_start|>`, ...) out of
text, where xgrammar would let their literal spelling into a JSON string; and its Lark dialect embeds JSON
schemas (`%json {...}`) and names tokens by id (`<[151657]>`), which is what a Qwen tool call needs.

- `response_format_schema(value)`: the schema `response_format` asks for; `json_grammar(schema)`: its
  grammar; `lark_grammar(text)`: a Lark one (the forced tool calls, built by serve/tools.py). JSON is written
  the way `json.dumps` writes it (", " and ": ", no other whitespace): Qwen's chat template renders tool calls
  that way, and a grammar without free whitespace cannot wander off into blank space.
- `check_grammar(grammar)`: the grammar's error message, or "" (at request parsing: a bad schema is a 400).
- `GrammarProcessor`: f(generated ids, logits (V,)) -> logits with every token the grammar forbids at -inf.
  It feeds the matcher the tokens it has not seen yet, then masks. The stop tokens (the eos ids the grammar
  vocabulary was built with) are allowed only where the grammar is complete, and once it can go no further
  they are all that is allowed, so the sequence ends there (the engine stops on them).
- `grammar_vocab(tokenizer, vocab_size, stop_ids)`: llguidance's view of the vocabulary, built once per
  tokenizer (2-3 s for Qwen2.5's 151,665 tokens) and cached. Its size is the model's embedding rows
  (151,936 or 152,064): llguidance pads the rows beyond the tokenizer with tokens no grammar allows, so they
  are always masked (a mask sized to the tokenizer would leave them free: vLLM PR #16210, llguidance#148).

llguidance is imported only when a constrained request arrives; without it (`pip install 'qwen2-pure[serve]'`)
such a request is a clear error and everything else works.
"""

from __future__ import annotations

import json
import threading
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import Qwen2PureError

# JSON as json.dumps writes it: the form of Qwen's tool calls in its chat template, and no free whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class RequestFieldError(Qwen2PureError):
    """A request field that cannot be served as given: the server answers 400 naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise Qwen2PureError("constrained decoding (response_format, tool_choice 'required' or a named function) "
                             "needs the llguidance package: pip install 'qwen2-pure[serve]'") from None
    return llguidance


def response_format_schema(value) -> Optional[dict]:
    """The JSON schema `response_format` asks the answer to follow: None for {"type": "text"} (or none given),
    {"type": "object"} for {"type": "json_object"}, json_schema.schema for {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}} (always enforced, whatever "strict" says)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise RequestFieldError(f"response_format={json.dumps(value)[:80]} is invalid: its type must be 'text', "
                                "'json_object' or 'json_schema'", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = value.get("json_schema")
    schema = spec.get("schema", {"type": "object"}) if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise RequestFieldError("response_format of type 'json_schema' needs \"json_schema\": {\"name\": ..., "
                                "\"schema\": {a JSON schema object}}", "response_format")
    return schema


def json_schema_for_grammar(schema: dict) -> dict:
    """`schema` with the JSON layout options llguidance reads from its "x-guidance" key (the schema's own win)."""
    return {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}


def json_grammar(schema: dict) -> str:
    """The grammar of JSON documents valid against `schema` ({"type": "object"} for json_object)."""
    return _llguidance().LLMatcher.grammar_from_json_schema(json_schema_for_grammar(schema))


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def check_grammar(grammar: str) -> str:
    """"" when `grammar` compiles, else llguidance's message (an unknown type, an unsupported keyword...)."""
    return _llguidance().LLMatcher.validate_grammar(grammar)


class GrammarVocab:
    """llguidance's tokenizer for our `Tokenizer`, with `vocab_size` rows and `stop_ids` as its end tokens."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        llg = _llguidance()
        if not stop_ids:
            raise Qwen2PureError("constrained decoding needs a stop token (the model's eos ids) to end the output")
        # tokenizer.json's text: llguidance builds its token trie from it with the same Rust tokenizers
        text = tokenizer._tok.to_str()  # the wrapped tokenizers.Tokenizer (qwen2_pure.tokenizer.Tokenizer)
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, tuple(int(i) for i in stop_ids)
        self.ll = llg.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(self.stop_ids))


_VOCABS: dict = {}  # (id(tokenizer), vocab_size, stop ids) -> GrammarVocab (which holds the tokenizer alive)
_VOCABS_LOCK = threading.Lock()


def grammar_vocab(tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> GrammarVocab:
    """The cached `GrammarVocab` (the first call per tokenizer takes 2-3 s: call it off the event loop)."""
    key = (id(tokenizer), int(vocab_size), tuple(int(i) for i in stop_ids))
    with _VOCABS_LOCK:  # one build, however many requests arrive at once
        vocab = _VOCABS.get(key)
        if vocab is None or vocab.tokenizer is not tokenizer:
            vocab = _VOCABS[key] = GrammarVocab(tokenizer, vocab_size, stop_ids)
        return vocab


class GrammarProcessor:
    """A `Sequence.logits_processor`: the tokens `grammar` does not allow next become -inf.

    Called as f(generated ids, logits (V,)) before each sample; the generated ids are the sequence's so far,
    and the ones not seen yet are fed to the matcher first (the engine samples only allowed tokens, so a
    refusal is a bug and raises, which fails this sequence alone).
    """

    def __init__(self, vocab: GrammarVocab, grammar: str):
        self.matcher = _llguidance().LLMatcher(vocab.ll, grammar)
        if self.matcher.is_error():
            raise Qwen2PureError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.vocab_size = vocab.vocab_size
        self.words = np.zeros((vocab.vocab_size + 31) // 32, dtype=np.int32)  # bit i of word j: token 32j + i
        self.seen = 0

    def feed(self, generated: Sequence[int]) -> None:
        for tok in generated[self.seen:]:
            if not self.matcher.consume_token(int(tok)):
                raise Qwen2PureError(f"the grammar refused token {int(tok)}: {self.matcher.get_error()}")
        self.seen = len(generated)

    def forbidden(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar does not allow next."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.matcher.is_error():
            raise Qwen2PureError(f"the grammar failed: {self.matcher.get_error()}")
        bits = np.unpackbits((~self.words).view(np.uint8), bitorder="little")[:self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self.feed(generated)
        forbidden = self.forbidden().to(logits.device)
        # a new tensor, never in place: the engine's raw logits still serve the log-probabilities
        return logits.masked_fill(forbidden[:logits.shape[-1]], float("-inf"))


def processor(tokenizer, vocab_size: int, stop_ids: Sequence[int], grammar: str) -> GrammarProcessor:
    """A fresh processor for one sequence (each keeps its own parser state)."""
    return GrammarProcessor(grammar_vocab(tokenizer, vocab_size, stop_ids), grammar)


def schema_text(schema) -> str:
    """A schema as the single-line JSON a Lark `%json` block takes."""
    return json.dumps(schema, ensure_ascii=False)


__all__ = ["JSON_OPTIONS", "GrammarProcessor", "GrammarVocab", "RequestFieldError", "check_grammar", "grammar_vocab",
           "json_grammar", "json_schema_for_grammar", "lark_grammar", "processor", "response_format_schema",
           "schema_text"]
