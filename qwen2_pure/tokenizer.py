"""The Qwen2 tokenizer: tokenizer.json + chat template + incremental (streaming) detokenization.

- `Tokenizer` wraps a `tokenizers.Tokenizer` built from tokenizer.json (the Rust BPE does the work)
  together with tokenizer_config.json (special tokens, chat template) and generation_config.json
  (stop ids). Ids equal transformers' `AutoTokenizer(...).encode(text)` for Qwen2: no BOS is added;
  the chat template writes every control token itself.
- `apply_chat_template` renders the model's Jinja chat template the way transformers does
  (sandboxed Jinja, trim_blocks + lstrip_blocks, `tojson` without HTML escaping, `raise_exception`,
  `strftime_now`), so prompts are byte-identical to `apply_chat_template(..., tokenize=False)`.
- `TextStream` turns generated ids into text as they arrive: never half a UTF-8 character (a CJK
  character or an emoji is often split over two or three byte-level tokens), stop strings trimmed.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _RustTokenizer

from .errors import Qwen2PureError, read_json_object

# Template variables transformers fills from the tokenizer's named special tokens.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                         "mask_token")


def _token_content(value) -> Optional[str]:
    """A special token entry of tokenizer_config.json: a string, or (older files) an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json_file(path: Path, required: bool) -> Optional[dict]:
    if not path.is_file():
        if required:
            raise Qwen2PureError(f"{path}: file not found (a tokenizer folder needs tokenizer.json)")
        return None
    return read_json_object(path)


class Tokenizer:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json) of a Qwen2 checkpoint.

    `tokenizer_json` is the text of tokenizer.json; `name` (a folder or file name) prefixes error messages.
    """

    def __init__(self, tokenizer_json: str, tokenizer_config: dict, generation_config: Optional[dict] = None,
                 name: str = ""):
        self.name = name or "tokenizer"
        try:
            self._tok = _RustTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON and for unknown fields
            raise Qwen2PureError(f"{self.name}: tokenizer.json is not valid JSON or not a tokenizer "
                                 f"({e})") from None
        self._config = dict(tokenizer_config or {})
        self._generation_config = dict(generation_config or {})
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Read tokenizer.json (required), tokenizer_config.json, generation_config.json and, when
        tokenizer_config.json has no template, chat_template.jinja (the newer transformers layout)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise Qwen2PureError(f"{tok_file}: file not found (a tokenizer folder needs tokenizer.json)")
        try:
            text = tok_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise Qwen2PureError(f"{tok_file}: not valid JSON (not UTF-8: {e})") from None
        config = _read_json_file(folder / "tokenizer_config.json", required=False) or {}
        jinja_file = folder / "chat_template.jinja"
        if "chat_template" not in config and jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        generation = _read_json_file(folder / "generation_config.json", required=False)
        return cls(text, config, generation, name=str(folder))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # ---- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") become their ids."""
        # add_special_tokens=False: Qwen2 adds no BOS/EOS (its post-processor is a ByteLevel no-op anyway).
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor). Invalid UTF-8 becomes U+FFFD, as in transformers."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    # ---- special tokens and configuration

    def _named_token_id(self, key: str) -> Optional[int]:
        content = _token_content(self._config.get(key))
        return None if content is None else self._tok.token_to_id(content)

    @property
    def eos_token_id(self) -> Optional[int]:
        """Id of tokenizer_config's eos_token (<|im_end|> for Instruct models)."""
        return self._named_token_id("eos_token")

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._named_token_id("pad_token")

    @property
    def bos_token_id(self) -> Optional[int]:
        """None for Qwen2 (no BOS), whatever generation_config's bos_token_id says."""
        return self._named_token_id("bos_token")

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generation: generation_config's eos_token_id (an int or a list), else eos_token."""
        eos = self._generation_config.get("eos_token_id")
        if eos is not None:
            return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
        return [] if self.eos_token_id is None else [self.eos_token_id]

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (what `skip_special_tokens` drops)."""
        return self._special_ids

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added ones included (151,665 for Qwen2.5). The embedding usually has more rows
        (151,936 or 152,064); ids beyond the tokenizer decode to nothing."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> Optional[str]:
        """The default chat template (None when the tokenizer has none)."""
        return self._select_template(tools=None, required=False)

    @property
    def tokenizer_config(self) -> dict:
        return dict(self._config)

    @property
    def generation_config(self) -> dict:
        """generation_config.json as a dict (empty when there is none)."""
        return dict(self._generation_config)

    # ---- chat template

    def _select_template(self, tools, required: bool = True) -> Optional[str]:
        template = self._config.get("chat_template")
        # Older tokenizer_config.json files hold several named templates: [{"name", "template"}, ...].
        # transformers picks "tool_use" when tools are given and it exists, else "default".
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if tools is not None and "tool_use" in named:
                template = named["tool_use"]
            elif "default" in named:
                template = named["default"]
            elif required:
                raise Qwen2PureError(f"{self.name}: tokenizer_config.json has several chat templates "
                                     f"({', '.join(map(str, named))}) and none is named 'default'")
            else:
                template = None
        if template is not None and not isinstance(template, str):
            raise Qwen2PureError(f"{self.name}: chat_template in tokenizer_config.json is a "
                                 f"{type(template).__name__}, expected a string")
        if template is None and required:
            raise Qwen2PureError(f"{self.name}: no chat_template (neither in tokenizer_config.json nor "
                                 "chat_template.jinja); this looks like a base model, so encode plain text "
                                 "instead of chat messages")
        return template

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: Optional[Sequence[dict]] = None, **extra) -> str:
        """The prompt text for `messages` ([{"role", "content", ...}]), as transformers'
        `apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False, **extra)`.

        `tools` are JSON-schema dicts (OpenAI format: {"type": "function", "function": {...}}). An
        assistant message may carry `tool_calls`; Qwen2.5's template writes their `arguments` with
        `tojson`, so pass them as a dict (an OpenAI-style JSON string would be quoted again).
        Extra keyword arguments become template variables.
        """
        template = self._select_template(tools)
        if isinstance(messages, dict) or not messages:
            raise Qwen2PureError("apply_chat_template: messages must be a non-empty list of dicts")
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise Qwen2PureError(f"apply_chat_template: message {i} is a {type(message).__name__}, "
                                     "expected a dict with 'role' and 'content'")
            # Like transformers: drop keys whose value is None (OpenAI clients send content=None next to
            # tool_calls; templates test `if message.content` / `is defined`, not `is none`).
            chat.append(_plain({k: v for k, v in message.items() if v is not None}))
        if tools is not None:
            for i, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise Qwen2PureError(f"apply_chat_template: tool {i} is a {type(tool).__name__}, expected "
                                         "a JSON-schema dict")
        variables = {key: content for key in _NAMED_SPECIAL_TOKENS
                     if (content := _token_content(self._config.get(key))) is not None}
        variables.update(extra)  # explicit arguments win over the special-token variables, as in transformers
        try:
            return _compile_template(template).render(
                messages=chat, tools=_plain(tools), documents=None,
                add_generation_prompt=add_generation_prompt, **_plain(variables))
        except jinja2.TemplateError as e:
            # raise_exception() in the template (e.g. "roles must alternate") or a template bug
            raise Qwen2PureError(f"{self.name}: chat template error: {e}") from None


def _plain(value: Any) -> Any:
    """A copy of `value` made of plain JSON-like types, so the template can neither mutate the caller's
    data nor reach methods of exotic objects (transformers does the same)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    # Subclasses of the scalar types (enums, numpy.float64 ...) carry extra methods: strip them.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if callable(getattr(value, "item", None)):  # numpy / torch scalars
        return _plain(value.item())
    if callable(getattr(value, "model_dump", None)):  # pydantic objects, e.g. from the openai client
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant tokens for
    training masks. We only need templates that use it to render, so the body renders unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML and sorts keys; chat templates want plain
    # json.dumps (Qwen2.5's tool list is `tool | tojson`), so this replaces it.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (a sandbox hardening transformers has)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key, value):
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key):
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {key!r}")


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Chat templates come with downloaded models: treat them as untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise Qwen2PureError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None


class TextStream:
    """Incremental detokenizer: `push(id)` returns the text that became printable, `finish()` the rest.

    UTF-8 safety: byte-level BPE splits many characters (CJK, emoji) over several tokens, and decoding a
    partial character yields U+FFFD. We decode a short window of recent ids and release text only when
    the window's text does not end in U+FFFD. The window starts at the previous release point, so each
    step costs O(1) however long the answer gets (the same scheme as vLLM's detokenizer). Only a run of
    tokens whose text keeps ending in an invalid byte sequence grows the window, for as long as it lasts.

    Stop strings (`stop`): text is held back while its end could be the beginning of a stop string. When
    one appears, `stopped` becomes True, `stop_string` names it, and the returned text ends just before
    it (the stop string itself is not returned, as in vLLM and the OpenAI API). Later pushes return "".

    The concatenation of everything returned equals `tokenizer.decode(all_ids, skip_special_tokens)`,
    truncated before the first stop string.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, stop: Optional[Sequence[str]] = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        if isinstance(stop, str):
            stop = [stop]
        self.stop = list(stop or [])
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise Qwen2PureError(f"stop strings must be non-empty strings, got {s!r}")
        self.stopped = False
        self.stop_string: Optional[str] = None
        # Window of ids still needed for decoding: ids[:read] were released (ids[:read] decodes to
        # `self._prefix_text`, a complete text ending on a character boundary), ids[read:] are held.
        self._ids: list[int] = []
        self._read = 0
        self._prefix_text = ""
        self._pending = ""  # decoded text held back because it may start a stop string

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self, flush: bool) -> str:
        """Text added by the held ids, or "" while it ends in a partial character (unless flushing)."""
        text = self._decode(self._ids)
        if not flush and (len(text) <= len(self._prefix_text) or text.endswith("\ufffd")):
            # Nothing printable yet: an incomplete character, or a token that decodes to nothing
            # (a skipped special token). Keep the ids and wait for more.
            return ""
        new = text[len(self._prefix_text):]
        # Slide the window: the next prefix is what was held until now.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids) if self._ids else ""
        return new

    def _release(self, text: str, final: bool) -> str:
        """Stop-string handling over the pending text plus `text`."""
        if not self.stop:
            return text
        self._pending += text
        hits = [(i, s) for s in self.stop if (i := self._pending.find(s)) >= 0]
        if hits:
            index, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            out = self._pending[:index]
            self._pending = ""
            self.stopped, self.stop_string = True, s
            return out
        if final:
            out, self._pending = self._pending, ""
            return out
        # Hold back the longest tail that is a proper prefix of some stop string.
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly printable text (often "")."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        return self._release(self._new_text(flush=False), final=False)

    def finish(self) -> str:
        """Return everything still held back (an incomplete character decodes to U+FFFD, as in `decode`)."""
        if self.stopped:
            return ""
        text = self._new_text(flush=True) if len(self._ids) > self._read else ""
        return self._release(text, final=True)
