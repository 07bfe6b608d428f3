"""Per-token cost of constrained decoding on the real Qwen2.5 vocabulary: llguidance, xgrammar, outlines-core.

    python benchmarks/grammar_mask.py [--tokenizer SRC] [--vocab 151936] [--repeats 3] [--random-tokens 200]

For each library that is installed (only llguidance is a dependency, the `serve` extra; the others are for the
comparison: `pip install xgrammar outlines-core`):
- vocabulary: building the library's view of the tokenizer (once per server);
- per schema (a tool call, a nested object with an array, enums and numbers, and any JSON object):
  compile = the schema to the first mask of a fresh matcher (cold: a fresh compiler, no cache);
- per token, walking a document valid against the schema as our tokenizer splits it (then the stop token):
  "mask" = advancing the matcher and computing the token mask (the library's own work), "mask + apply" =
  that and setting the forbidden entries of a (V,) fp32 logits row to -inf (llguidance and outlines-core as
  `qwen2_pure.serve.constrained.GrammarProcessor` does, xgrammar with its native CPU kernel);
- random: the same per-token cost while sampling from random logits under the mask (strings fill with
  arbitrary tokens: the largest allowed sets), for llguidance and xgrammar.
The masks are checked against each other: the document's every token must be allowed. Prints a markdown
table and writes benchmarks/results/grammar_mask.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import qwen2_pure as q
from qwen2_pure.serve import constrained

HERE = Path(__file__).resolve().parent
SEPARATORS = (", ", ": ")  # the layout the server's grammars use (json.dumps's)

SCHEMAS = {
    "tool call": ({"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}, "required": ["name", "arguments"]},
        {"name": "get_weather", "arguments": {"city": "San Francisco, CA", "unit": "celsius"}}),
    "nested": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "number"}},
                    "required": ["city"]}}, "required": ["name", "age", "address"]},
        {"name": "Alice Smith", "age": 42, "tags": ["admin", "ops"],
         "address": {"city": "Paris, France", "zip": 75001.5}}),
    "json_object": ({"type": "object"}, {"id": 7, "ok": True, "items": [1.5, "two", None], "meta": {"k": "v"}}),
}


def quantiles(times: list[float]) -> dict:
    us = sorted(t * 1e6 for t in times)
    return {"median_us": statistics.median(us), "mean_us": statistics.mean(us),
            "p99_us": us[min(len(us) - 1, int(0.99 * len(us)))], "max_us": us[-1], "tokens": len(us)}


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab, stops):
        self.vocab = constrained.GrammarVocab(tok, vocab, stops)

    def start(self, schema):
        return constrained.GrammarProcessor(self.vocab, constrained.json_grammar(schema))

    @staticmethod
    def mask(p, generated):
        p.feed(generated)
        return p.forbidden()

    @staticmethod
    def apply(p, forbidden, logits):
        return logits.masked_fill(forbidden, float("-inf"))  # as GrammarProcessor.__call__


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab, stops):
        import xgrammar as xgr
        self.xgr = xgr
        special = tok.special_token_ids
        # control tokens as "" (xgrammar would take their literal text, e.g. "<|im_start|>", as JSON text)
        encoded = ["" if i in special else tok.id_to_token(i) for i in range(tok.vocab_size)]
        self.info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=stops)
        self.vocab = vocab

    def start(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
        m = self.xgr.GrammarMatcher(compiled)
        return {"m": m, "mask": self.xgr.allocate_token_bitmask(1, self.vocab), "seen": 0}

    def mask(self, s, generated):
        for t in generated[s["seen"]:]:
            assert s["m"].accept_token(t), t
        s["seen"] = len(generated)
        s["m"].fill_next_token_bitmask(s["mask"])
        return s["mask"]

    def apply(self, s, mask, logits):
        logits = logits.clone()
        self.xgr.apply_token_bitmask_inplace(logits[None], mask)  # its native CPU kernel
        return logits


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab, stops):
        import outlines_core as oc
        from qwen2_pure.loading.gguf_tokenizer import _bytes_to_unicode
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        tokens: dict = {}
        for i in range(tok.vocab_size):
            piece = tok.id_to_token(i)
            if i in tok.special_token_ids or not piece:
                continue
            key = bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else piece.encode()
            tokens.setdefault(key, []).append(i)
        self.oc, self.vocab, self.eos = oc, vocab, stops[0]
        self.vocabulary = oc.Vocabulary(self.eos, tokens)

    def start(self, schema):
        from outlines_core.json_schema import build_regex_from_schema
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        guide = self.oc.Guide(self.oc.Index(regex, self.vocabulary))
        return {"g": guide, "mask": torch.zeros((self.vocab + 31) // 32, dtype=torch.int32), "seen": 0}

    def mask(self, s, generated):
        for t in generated[s["seen"]:]:
            s["g"].advance(t)
        s["seen"] = len(generated)
        s["mask"].zero_()
        s["g"].write_mask_into(s["mask"].data_ptr(), s["mask"].numel(), 4)
        return s["mask"]

    def apply(self, s, mask, logits):  # as the server applies llguidance's
        bits = np.unpackbits((~mask.numpy()).view(np.uint8), bitorder="little")[:self.vocab]
        return logits.masked_fill(torch.from_numpy(bits.view(np.bool_)), float("-inf"))


def step(lib, state, generated, logits) -> tuple[torch.Tensor, float, float]:
    """(masked logits, seconds to advance and compute the mask, seconds in all) of one token."""
    t0 = time.perf_counter()
    mask = lib.mask(state, generated)
    t1 = time.perf_counter()
    out = lib.apply(state, mask, logits)
    return out, t1 - t0, time.perf_counter() - t0


def walk(lib, schema, tokens, vocab) -> tuple[float, list[float], list[float]]:
    """(compile seconds, per-token mask seconds, per-token total seconds) of one pass over `tokens` (the last
    one a stop token)."""
    t0 = time.perf_counter()
    state = lib.start(schema)
    logits = torch.zeros(vocab)
    first, _, _ = step(lib, state, [], logits)
    compile_s = time.perf_counter() - t0
    assert torch.isfinite(first[tokens[0]]), f"{lib.name}: the first token is not allowed"
    masks, totals = [], []
    for k in range(1, len(tokens)):
        out, mask_s, total_s = step(lib, state, tokens[:k], logits)
        masks.append(mask_s)
        totals.append(total_s)
        assert torch.isfinite(out[tokens[k]]), f"{lib.name}: token {k} ({tokens[k]}) is not allowed"
    return compile_s, masks, totals


def random_walk(lib, schema, vocab, stops, n, seed=0) -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(seed)
    state, generated, masks, totals = lib.start(schema), [], [], []
    while len(generated) < n:
        logits = torch.randn(vocab, generator=g)
        out, mask_s, total_s = step(lib, state, generated, logits)
        masks.append(mask_s)
        totals.append(total_s)
        tok = int(torch.multinomial(torch.softmax(out, -1), 1, generator=g))
        if tok in stops:
            state, generated = lib.start(schema), []
        else:
            generated.append(tok)
    return masks, totals


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="demo", help="a checkpoint (folder, GGUF, name) whose tokenizer to use")
    ap.add_argument("--vocab", type=int, default=151936, help="the model's embedding rows (masks cover them all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random-tokens", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "results" / "grammar_mask.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = q.load_tokenizer(args.tokenizer)
    stops = list(tok.stop_token_ids)
    libs, results = [], {}
    for cls in (Llguidance, Xgrammar, OutlinesCore):
        t0 = time.perf_counter()
        try:
            lib = cls(tok, args.vocab, stops)
        except ImportError as e:
            print(f"[{cls.name}: not installed ({e})]")
            continue
        results[cls.name] = {"vocab_s": time.perf_counter() - t0, "schemas": {}}
        libs.append(lib)
    for label, (schema, doc) in SCHEMAS.items():
        tokens = tok.encode(json.dumps(doc, ensure_ascii=False)) + [stops[0]]
        for lib in libs:
            compiles, masks, totals = [], [], []
            for _ in range(args.repeats):
                c, m, t = walk(lib, schema, tokens, args.vocab)
                compiles.append(c)
                masks += m
                totals += t
            row = {"compile_ms": statistics.median(compiles) * 1e3, "document_mask": quantiles(masks),
                   "document": quantiles(totals)}
            if lib.name != "outlines-core":  # its Index build per schema makes a long random walk slow
                m, t = random_walk(lib, schema, args.vocab, stops, args.random_tokens)
                row["random_mask"], row["random"] = quantiles(m), quantiles(t)
            results[lib.name]["schemas"][label] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"vocab": args.vocab, "tokenizer": tok.vocab_size, "results": results},
                                         indent=2))
    def cell(row, key):
        q_ = row.get(key)
        return "—" if q_ is None else f"{q_['median_us']:.0f} / {q_['p99_us']:.0f}"

    print("| library | vocabulary s | schema | compile ms | document: mask µs (median / p99) | document: mask + "
          "apply µs | random: mask µs | random: mask + apply µs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for label, row in r["schemas"].items():
            print(f"| {name} | {r['vocab_s']:.2f} | {label} | {row['compile_ms']:.1f} | {cell(row, 'document_mask')} "
                  f"| {cell(row, 'document')} | {cell(row, 'random_mask')} | {cell(row, 'random')} |")


if __name__ == "__main__":
    main()
