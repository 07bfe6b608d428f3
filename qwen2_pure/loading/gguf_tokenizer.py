"""The tokenizer files of a Qwen2 GGUF: tokenizer.json, tokenizer_config.json and generation_config.json.

A GGUF carries no tokenizer.json. It stores llama.cpp's description of the vocabulary as metadata:

    tokenizer.ggml.model        "gpt2" = byte-level BPE
    tokenizer.ggml.pre          which pre-tokenizer regex the merges were learned with ("qwen2")
    tokenizer.ggml.tokens       every id's string, in the byte-level alphabet (GPT-2 `bytes_to_unicode`)
    tokenizer.ggml.token_type   1 normal, 3 control (special), 4 user defined (added, not special), 5 unused
    tokenizer.ggml.merges       "left right" strings in rank order
    tokenizer.ggml.{bos,eos,padding,eot,eom}_token_id, tokenizer.ggml.add_bos_token, tokenizer.chat_template

From that we rebuild the files an official Qwen2 / Qwen2.5 checkpoint ships, so that the rest of the
package (and transformers) sees an ordinary HF tokenizer:

- tokenizer.json: NFC normalizer; pre-tokenizer = regex Split (Isolated) then ByteLevel without prefix
  space or regex; BPE without unk or byte fallback over the normal tokens; ByteLevel decoder and
  post-processor; control tokens as special added tokens, user-defined ones as plain added tokens.
- tokenizer_config.json: the fields of an official Qwen2.5 tokenizer_config.json.
- generation_config.json: only token ids (no sampling values: the GGUF has none); the stop ids are
  eos, eot, eom and <|endoftext|>, never the padding token (see `_stop_ids`).

What a GGUF cannot give back (llama.cpp's converter loses it):
- Whether an added token was `special` in the original. llama.cpp marks every `<|...|>` token as
  control, so Qwen2.5's FIM tokens (`<|fim_prefix|>` ... `<|file_sep|>`, special=false upstream)
  come back as special; `decode(..., skip_special_tokens=True)` then drops them. We follow the file
  rather than guess from token names.
- The [PAD151665]... rows (token_type 5, "unused"): llama.cpp invents them to pad the vocabulary to
  the embedding size. The official tokenizer has no such tokens, so they are left out; the tokenizer
  then has 151,665 tokens while the embedding has 151,936 rows, as with the official files.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import Qwen2PureError

# The Qwen2 pre-tokenizer regex (tokenizer.json of Qwen/Qwen2-7B-Instruct and every Qwen2.5 model).
# Digits are split one per piece (\p{N}); letters are \p{L}+ (Qwen3.5 later widened this to [\p{L}\p{M}]+).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre values whose llama.cpp pre-tokenizer is the Qwen2 regex above.
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")

# llama.cpp's token types (gguf.TokenType); spelled out so this module reads without gguf's enum.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are spelled in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def _reader_name(reader) -> str:
    """The file a GGUFReader reads (for error messages)."""
    name = getattr(getattr(reader, "data", None), "filename", None)
    return str(name) if name else "GGUF file"


def _field(reader, key: str, required: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise Qwen2PureError(f"{_reader_name(reader)}: no tokenizer metadata key '{key}' "
                                 "(this GGUF cannot be used without its tokenizer)")
        return None
    return field.contents()


def _added_token(token_id: int, content: str, special: bool) -> dict:
    # Field order and values as in the official Qwen2 tokenizer.json.
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _stop_ids(tokens: list[str], token_types: list[int], eos_id: int, eot_id, eom_id) -> list[int]:
    """generation_config's eos_token_id: the ids that end a generation, each from the key that means it.

    The eos, eot (end of turn) and eom (end of message) keys, then the control token <|endoftext|>, which
    ends every Qwen model's text: official generation_config.json has "eos_token_id": [151645, 151643]
    (<|im_end|>, <|endoftext|>) for Instruct models and 151643 for base ones, and llama.cpp's Qwen GGUFs
    name <|endoftext|> by no key but padding_token_id (and bos). llama.cpp too ends a generation on eos, eot,
    eom and on tokens it knows by their text, <|im_end|> and <|endoftext|> among them (special_eog_ids in
    src/llama-vocab.cpp). The padding token is never a stop id: third-party Qwen GGUFs (distilled models)
    set padding_token_id to <|vision_pad|>, which ends nothing.
    """
    stop: list[int] = []
    text_end = next((i for i, (t, ty) in enumerate(zip(tokens, token_types))
                     if t == "<|endoftext|>" and ty == _CONTROL), None)
    for tid in (eos_id, eot_id, eom_id, text_end):
        if tid is not None and int(tid) not in stop:
            stop.append(int(tid))
    return stop


def gguf_tokenizer_files(reader) -> tuple[str, dict, dict]:
    """(tokenizer.json text, tokenizer_config dict, generation_config dict) from a GGUF's metadata.

    `reader` is a `gguf.GGUFReader`. A file without the tokenizer keys, or whose tokenizer is not Qwen2's
    byte-level BPE, is a Qwen2PureError naming the file and the key.
    """
    where = _reader_name(reader)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise Qwen2PureError(f"{where}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2'), "
                             "the Qwen2 tokenizer, is supported")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in QWEN2_PRE_TOKENIZERS:
        raise Qwen2PureError(f"{where}: tokenizer.ggml.pre is {pre!r}; only the Qwen2 pre-tokenizer "
                             f"({', '.join(QWEN2_PRE_TOKENIZERS)}) is supported")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges")
    if len(token_types) != len(tokens):
        raise Qwen2PureError(f"{where}: tokenizer.ggml.token_type has {len(token_types)} entries but "
                             f"tokenizer.ggml.tokens has {len(tokens)}")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id", required=False)
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id", required=False)
    eot_id = _field(reader, "tokenizer.ggml.eot_token_id", required=False)  # end of turn
    eom_id = _field(reader, "tokenizer.ggml.eom_token_id", required=False)  # end of message (tool calls)
    for key, tid in (("eos_token_id", eos_id), ("bos_token_id", bos_id), ("padding_token_id", pad_id),
                     ("eot_token_id", eot_id), ("eom_token_id", eom_id)):
        if tid is not None and not 0 <= tid < len(tokens):
            raise Qwen2PureError(f"{where}: tokenizer.ggml.{key} = {tid} is outside the vocabulary "
                                 f"of {len(tokens)} tokens")

    # Normal tokens form the BPE vocabulary; control and user-defined tokens are added tokens, matched
    # whole in the text before BPE runs; unused padding rows are dropped (see the module docstring).
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    added: list[dict] = []
    for token_id, (token, ttype) in enumerate(zip(tokens, token_types)):
        if ttype == _CONTROL:
            added.append(_added_token(token_id, token, special=True))
        elif ttype == _USER_DEFINED:
            added.append(_added_token(token_id, token, special=False))
        elif ttype == _UNUSED:
            continue
        else:
            if not set(token) <= alphabet:
                # Some converters store a normal token as plain text; respell it in the byte alphabet
                # so that BPE (which only ever produces byte-alphabet strings) can reach it.
                token = "".join(spelling[b] for b in token.encode("utf-8"))
            vocab[token] = token_id

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": list(merges),
        },
    }

    def name_of(tid):
        return tokens[tid] if tid is not None else None

    # additional_special_tokens: as in the official files, every special added token except
    # <|endoftext|> (which is already named as pad, and bos in the generation config).
    named_elsewhere = {name_of(pad_id), name_of(bos_id)} - {None}
    tokenizer_config: dict[str, Any] = {}
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", required=False)
    if add_bos is not None:
        tokenizer_config["add_bos_token"] = bool(add_bos)
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token", required=False)
    if add_eos is not None:
        tokenizer_config["add_eos_token"] = bool(add_eos)
    tokenizer_config.update({
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added
        },
        "additional_special_tokens": [t["content"] for t in added
                                      if t["special"] and t["content"] not in named_elsewhere],
        # Qwen2 has no BOS: bos_token_id 151643 appears in the generation config, but the tokenizer
        # never prepends it (official tokenizer_config.json: "bos_token": null).
        "bos_token": None,
    })
    chat_template = _field(reader, "tokenizer.chat_template", required=False)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    tokenizer_config.update({
        "clean_up_tokenization_spaces": False,
        "eos_token": tokens[eos_id],
        "errors": "replace",
    })
    arch = _field(reader, "general.architecture", required=False)
    context = _field(reader, f"{arch}.context_length", required=False) if arch else None
    if context is not None:
        tokenizer_config["model_max_length"] = int(context)
    tokenizer_config.update({
        "pad_token": name_of(pad_id),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })

    generation_config: dict[str, Any] = {}
    if bos_id is not None:
        generation_config["bos_token_id"] = int(bos_id)
    stop = _stop_ids(tokens, token_types, eos_id, eot_id, eom_id)
    generation_config["eos_token_id"] = stop if len(stop) > 1 else stop[0]
    if pad_id is not None:
        generation_config["pad_token_id"] = int(pad_id)

    return json.dumps(tokenizer_json, ensure_ascii=False), tokenizer_config, generation_config
