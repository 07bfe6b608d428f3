"""Supervised fine-tuning data, read and encoded the way LLaMA-Factory does it (`--stage sft --template qwen`).

The pipeline, one function per step (all pure Python; only the collator makes tensors):

    dataset_info.json ──load_dataset_info──▶ DatasetAttr
    JSON/JSONL records ──load_conversations──▶ Conversation (system + alternating user/assistant messages)
    Conversation ──encode_supervised──▶ (input_ids, labels)   qwen template, prompt masked with -100,
                                                               cutoff_len truncation turn by turn (infer_seqlen)
    examples ──pack_examples──▶ bins of cutoff_len tokens     only with packing=True
    examples ──split_dataset──▶ (train, eval)                  val_size, reproducible from the seed
    batch ──SFTCollator──▶ {input_ids, attention_mask, labels} right padding, -100 in padded labels

`build_sft_data` runs them all, as LLaMA-Factory's `get_dataset` does for the seed's command line.

Which LLaMA-Factory: by default we match **v0.8.x** (v0.8.3 read line by line), the release current when the seed's
command was written (June 2024, the week Qwen2 came out). Its `qwen` template uses Qwen2-Instruct's official default
system prompt "You are a helpful assistant.", trains `{answer}<|im_end|>` and puts the "\\n" that follows `<|im_end|>`
at the start of the next prompt (a masked separator). Later releases changed tokens and labels (see `QWEN_TEMPLATES`):
v0.9.2 trains `{answer}<|im_end|>\\n`, v0.9.3+ also switched the default system prompt to Qwen2.5's. Pick one with
`template="0.9.3"` (or pass your own `QwenTemplate`), and the system prompt with `default_system=`.

LLaMA-Factory does not use the tokenizer's Jinja chat template for training: it formats each message with its own
slot strings and tokenizes each piece separately (special tokens in the text become their ids). We do the same
with our `Tokenizer.encode`. For Qwen2/Qwen2.5 tokenizers the result equals tokenizing the whole conversation
rendered by the official chat template (v0.9.2 layout) because every piece boundary sits at a special token.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import Qwen2PureError, read_json_object

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------------------------
# The qwen template
# ---------------------------------------------------------------------------------------------------------------

QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class QwenTemplate:
    """LLaMA-Factory's `qwen` template as slot strings; "{content}" is replaced (never str.format'ed, so braces in
    data are safe). `separator` starts the prompt of every turn after the first (masked, as in v0.8.x)."""

    name: str
    default_system: str
    system: str = "<|im_start|>system\n{content}<|im_end|>\n"
    user: str = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assistant: str = "{content}<|im_end|>"
    observation: str = "<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n"
    separator: str = "\n"


QWEN_TEMPLATES = {
    # v0.8.0 - v0.9.1: label = answer + <|im_end|>; "\n" separator masked at the start of turns >= 2.
    "0.8": QwenTemplate("0.8", QWEN2_DEFAULT_SYSTEM),
    # v0.9.2: label = answer + <|im_end|> + "\n"; no separator; tool results as a user turn.
    "0.9.2": QwenTemplate(
        "0.9.2", QWEN2_DEFAULT_SYSTEM, assistant="{content}<|im_end|>\n", separator="",
        observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n"),
    # v0.9.3+ (commit c3c0efb, April 2025): as v0.9.2 with Qwen2.5's default system prompt.
    "0.9.3": QwenTemplate(
        "0.9.3", QWEN25_DEFAULT_SYSTEM, assistant="{content}<|im_end|>\n", separator="",
        observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n"),
}
DEFAULT_TEMPLATE_VERSION = "0.8"


def get_template(version: Union[str, QwenTemplate] = DEFAULT_TEMPLATE_VERSION,
                 default_system: Optional[str] = None) -> QwenTemplate:
    """The qwen template of a LLaMA-Factory version ("0.8", "0.9.2", "0.9.3"; "0.9.0"/"0.9.1" are "0.8", later
    ones "0.9.3"), with `default_system` (used when a sample has no system prompt) replaced when given."""
    if isinstance(version, QwenTemplate):
        template = version
    else:
        key = str(version).lstrip("v")
        aliases = {"0.8.0": "0.8", "0.8.1": "0.8", "0.8.2": "0.8", "0.8.3": "0.8", "0.9": "0.8", "0.9.0": "0.8",
                   "0.9.1": "0.8", "0.9.2": "0.9.2", "0.9.4": "0.9.3", "latest": "0.9.3"}
        key = aliases.get(key, key)
        if key not in QWEN_TEMPLATES:
            raise Qwen2PureError(f"template version {version!r}: expected one of {', '.join(QWEN_TEMPLATES)} "
                                 "(the LLaMA-Factory release whose qwen template to match)")
        template = QWEN_TEMPLATES[key]
    if default_system is not None:
        template = replace(template, default_system=default_system)
    return template


# ---------------------------------------------------------------------------------------------------------------
# dataset_info.json
# ---------------------------------------------------------------------------------------------------------------

_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
_SHAREGPT_COLUMNS = {"messages": "conversations"}
_SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                  "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_FILE_TYPES = {".json": "json", ".jsonl": "json"}
_UNSUPPORTED_TYPES = {".csv", ".parquet", ".arrow", ".txt"}


@dataclass
class DatasetAttr:
    """One dataset_info.json entry, with LLaMA-Factory's defaults filled in."""

    name: str
    load_from: str  # "file", "hf_hub" or "ms_hub"
    file_name: Optional[str] = None
    hf_hub_url: Optional[str] = None
    ms_hub_url: Optional[str] = None
    formatting: str = "alpaca"
    ranking: bool = False
    subset: Optional[str] = None
    split: str = "train"
    folder: Optional[str] = None
    columns: dict = field(default_factory=dict)  # LLaMA-Factory column name -> key in the records
    tags: dict = field(default_factory=dict)

    def column(self, key: str) -> Optional[str]:
        return self.columns.get(key)


def _use_modelscope() -> bool:
    return os.environ.get("USE_MODELSCOPE_HUB", "0").lower() in ("true", "1")


def parse_dataset_entry(name: str, info: dict, where: str = "dataset_info.json") -> DatasetAttr:
    """A DatasetAttr from one entry of dataset_info.json (as LLaMA-Factory's `get_dataset_list` reads it)."""
    if not isinstance(info, dict):
        raise Qwen2PureError(f"{where}: entry {name!r} is a {type(info).__name__}, expected an object")
    if "hf_hub_url" in info or "ms_hub_url" in info:
        # LLaMA-Factory prefers the Hugging Face hub unless USE_MODELSCOPE_HUB=1 and an ms_hub_url exists.
        load_from = "ms_hub" if ("ms_hub_url" in info and (_use_modelscope() or "hf_hub_url" not in info)) \
            else "hf_hub"
    elif "file_name" in info:
        load_from = "file"
    elif "script_url" in info or "cloud_file_name" in info:
        raise Qwen2PureError(f"{where}: entry {name!r} uses script_url/cloud_file_name, which qwen2-pure does not "
                             "support; point file_name at a local JSON/JSONL file instead")
    else:
        raise Qwen2PureError(f"{where}: entry {name!r} has none of file_name, hf_hub_url, ms_hub_url")
    formatting = info.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise Qwen2PureError(f"{where}: entry {name!r} has formatting {formatting!r}, expected 'alpaca' or "
                             "'sharegpt'")
    columns = dict(_ALPACA_COLUMNS if formatting == "alpaca" else _SHAREGPT_COLUMNS)
    given = info.get("columns") or {}
    if not isinstance(given, dict):
        raise Qwen2PureError(f"{where}: entry {name!r}: 'columns' must be an object")
    columns.update({k: v for k, v in given.items() if v})
    tags = dict(_SHAREGPT_TAGS) if formatting == "sharegpt" else {}
    given_tags = info.get("tags") or {}
    if not isinstance(given_tags, dict):
        raise Qwen2PureError(f"{where}: entry {name!r}: 'tags' must be an object")
    tags.update({k: v for k, v in given_tags.items() if v})
    return DatasetAttr(name=name, load_from=load_from, file_name=info.get("file_name"),
                       hf_hub_url=info.get("hf_hub_url"), ms_hub_url=info.get("ms_hub_url"), formatting=formatting,
                       ranking=bool(info.get("ranking", False)), subset=info.get("subset"),
                       split=info.get("split", "train"), folder=info.get("folder"), columns=columns, tags=tags)


def load_dataset_info(dataset_dir: Union[str, os.PathLike]) -> dict[str, DatasetAttr]:
    """All entries of `dataset_dir`/dataset_info.json."""
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise Qwen2PureError(f"{path}: file not found (--dataset_dir must hold a dataset_info.json that registers "
                             "the datasets named by --dataset)")
    info = read_json_object(path, "a JSON object mapping dataset names to entries")
    return {name: parse_dataset_entry(name, entry, str(path)) for name, entry in info.items()}


# ---------------------------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Conversation:
    """A sample after alignment: `messages` alternate user/assistant (observation counts as user), starting with
    a user turn and ending with an assistant turn; `system` is "" when the sample has none (the template's
    default is used then). `source` is "file:record-index" for error messages."""

    messages: list
    system: str = ""
    source: str = ""


def read_records(path: Union[str, os.PathLike]) -> list:
    """The records of a JSON file (a list of objects) or a JSONL file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise Qwen2PureError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in _UNSUPPORTED_TYPES:
        raise Qwen2PureError(f"{path}: {suffix} files are not supported; convert the data to JSON or JSONL")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Qwen2PureError(f"{path}: not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[" or suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            if suffix == ".json" and stripped[0] == "{":  # a .json file written as JSON lines
                return _read_jsonl(path, text)
            raise Qwen2PureError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise Qwen2PureError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
        return data
    return _read_jsonl(path, text)


def _read_jsonl(path: Path, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise Qwen2PureError(f"{path}: line {lineno} (record {len(records)}) is not valid JSON ({e})") from None
    return records


def _data_files(attr: DatasetAttr, dataset_dir: Path) -> list[Path]:
    path = dataset_dir / attr.file_name
    if path.is_dir():  # LLaMA-Factory reads every file of a folder (they must share one type)
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise Qwen2PureError(f"{path}: folder of dataset {attr.name!r} holds no files")
        return files
    if not path.is_file():
        raise Qwen2PureError(f"{path}: file of dataset {attr.name!r} not found (file_name in "
                             f"{dataset_dir / 'dataset_info.json'} is relative to --dataset_dir)")
    return [path]


def _hub_message(attr: DatasetAttr, reason: str) -> str:
    hub = f"Hugging Face hub '{attr.hf_hub_url}'" if attr.load_from == "hf_hub" else \
        f"ModelScope '{attr.ms_hub_url}'"
    return (f"dataset {attr.name!r} lives on the {hub} and could not be fetched: {reason}. To train offline, "
            f"download its data file (JSON/JSONL), put it in --dataset_dir and register it in dataset_info.json, "
            f"e.g. \"{attr.name}\": {{\"file_name\": \"{attr.name}.json\"}} (alpaca format; add \"formatting\": "
            "\"sharegpt\" and \"columns\" for other layouts)")


def _fetch_hub_records(attr: DatasetAttr) -> list:
    """Records of a hub dataset through `datasets` (Hugging Face) or `modelscope`, whichever the entry uses."""
    if attr.load_from == "ms_hub":
        try:
            from modelscope import MsDataset  # type: ignore
        except ImportError:
            raise Qwen2PureError(_hub_message(attr, "the modelscope package is not installed "
                                                    "(pip install modelscope)")) from None
        try:
            ds = MsDataset.load(attr.ms_hub_url, subset_name=attr.subset, split=attr.split)
            ds = ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds
            return [dict(r) for r in ds]
        except Exception as e:  # noqa: BLE001  (network, authentication, missing dataset: all one to the user)
            raise Qwen2PureError(_hub_message(attr, f"{type(e).__name__}: {e}")) from None
    try:
        import datasets  # type: ignore
    except ImportError:
        raise Qwen2PureError(_hub_message(attr, "the datasets package is not installed (pip install datasets)")) \
            from None
    try:
        ds = datasets.load_dataset(attr.hf_hub_url, name=attr.subset, data_dir=attr.folder, split=attr.split)
        return [dict(r) for r in ds]
    except Exception as e:  # noqa: BLE001  (as above)
        raise Qwen2PureError(_hub_message(attr, f"{type(e).__name__}: {e}")) from None


def _text(value, what: str, where: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise Qwen2PureError(f"{where}: {what} must be a string, found "
                             f"{'nothing' if value is None else type(value).__name__}")
    return value


def align_alpaca(record, attr: DatasetAttr, where: str) -> Conversation:
    """LLaMA-Factory's `convert_alpaca`: history pairs, then "instruction\\ninput" → output."""
    if not isinstance(record, dict):
        raise Qwen2PureError(f"{where}: expected an object with alpaca fields, found {type(record).__name__}")
    messages = []
    history_key = attr.column("history")
    if history_key and record.get(history_key) is not None:
        history = record[history_key]
        if not isinstance(history, list):
            raise Qwen2PureError(f"{where}: '{history_key}' must be a list of [question, answer] pairs")
        for j, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise Qwen2PureError(f"{where}: '{history_key}'[{j}] must be a [question, answer] pair")
            messages.append({"role": "user", "content": _text(pair[0], f"'{history_key}'[{j}][0]", where)})
            messages.append({"role": "assistant", "content": _text(pair[1], f"'{history_key}'[{j}][1]", where)})
    prompt_key, query_key, response_key = attr.column("prompt"), attr.column("query"), attr.column("response")
    if prompt_key not in record:
        raise Qwen2PureError(f"{where}: missing the '{prompt_key}' field (alpaca records need "
                             f"'{prompt_key}' and '{response_key}')")
    parts = [_text(record.get(prompt_key), f"'{prompt_key}'", where)]
    if query_key:
        parts.append(_text(record.get(query_key), f"'{query_key}'", where, required=False))
    messages.append({"role": "user", "content": "\n".join(p for p in parts if p)})
    if response_key not in record:
        raise Qwen2PureError(f"{where}: missing the '{response_key}' field (the answer to train on)")
    messages.append({"role": "assistant", "content": _text(record[response_key], f"'{response_key}'", where)})
    system_key = attr.column("system")
    system = _text(record.get(system_key), f"'{system_key}'", where, required=False) if system_key else ""
    _reject_tools(record, attr, where)
    return Conversation(messages, system, where)


def _reject_tools(record: dict, attr: DatasetAttr, where: str) -> None:
    tools_key = attr.column("tools")
    if tools_key and record.get(tools_key):
        raise Qwen2PureError(f"{where}: tool definitions ('{tools_key}') are not supported by qwen2-pure's trainer "
                             "yet; remove the tools column from dataset_info.json to train on the text turns")


def align_sharegpt(record, attr: DatasetAttr, where: str) -> Conversation:
    """LLaMA-Factory's `convert_sharegpt`: an optional leading system message, then user (or observation) turns
    at even positions and assistant turns at odd positions, an even number in all."""
    if not isinstance(record, dict):
        raise Qwen2PureError(f"{where}: expected an object with a '{attr.column('messages')}' list, found "
                             f"{type(record).__name__}")
    t = attr.tags
    messages_key = attr.column("messages")
    turns = record.get(messages_key)
    if not isinstance(turns, list):
        raise Qwen2PureError(f"{where}: '{messages_key}' must be a list of messages, found "
                             f"{'nothing' if turns is None else type(turns).__name__}")
    role_tag, content_tag = t["role_tag"], t["content_tag"]
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or role_tag not in m or content_tag not in m:
            raise Qwen2PureError(f"{where}: message {j} must be an object with '{role_tag}' and '{content_tag}'")
    system_key = attr.column("system")
    if t.get("system_tag") and turns and turns[0][role_tag] == t["system_tag"]:
        system = _text(turns[0][content_tag], "the system message", where)
        turns = turns[1:]
    else:
        system = _text(record.get(system_key), f"'{system_key}'", where, required=False) if system_key else ""
    if not turns:
        raise Qwen2PureError(f"{where}: no messages besides the system prompt")
    roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t.get("observation_tag"): "observation",
             t.get("function_tag"): "function"}
    accept = ((t["user_tag"], t.get("observation_tag")), (t["assistant_tag"], t.get("function_tag")))
    messages = []
    for j, m in enumerate(turns):
        role = m[role_tag]
        if role not in accept[j % 2]:
            expected = " or ".join(repr(r) for r in accept[j % 2] if r)
            raise Qwen2PureError(f"{where}: message {j} has role {role!r} where {expected} was expected (turns "
                                 "must alternate user/assistant)")
        if roles[role] == "function":
            raise Qwen2PureError(f"{where}: message {j} is a function call ({role!r}); tool-calling data is not "
                                 "supported by qwen2-pure's trainer yet")
        messages.append({"role": roles[role], "content": _text(m[content_tag], f"message {j} content", where)})
    if len(messages) % 2:
        raise Qwen2PureError(f"{where}: {len(messages)} messages; a sample must end with an assistant message "
                             "(user/assistant pairs)")
    _reject_tools(record, attr, where)
    return Conversation(messages, system, where)


def load_dataset_records(attr: DatasetAttr, dataset_dir: Union[str, os.PathLike] = "data",
                         max_samples: Optional[int] = None) -> list[Conversation]:
    """The aligned conversations of one dataset (the first `max_samples` records when given, as LLaMA-Factory)."""
    dataset_dir = Path(dataset_dir)
    if attr.ranking:
        raise Qwen2PureError(f"dataset {attr.name!r} is a ranking (preference) dataset; SFT needs plain samples")
    if attr.load_from == "file":
        sources = [(str(p), read_records(p)) for p in _data_files(attr, dataset_dir)]
    else:
        sources = [(f"{attr.name} ({attr.load_from})", _fetch_hub_records(attr))]
    align = align_alpaca if attr.formatting == "alpaca" else align_sharegpt
    conversations = []
    for where, records in sources:
        for i, record in enumerate(records):
            if max_samples is not None and len(conversations) >= max_samples:
                return conversations
            conversations.append(align(record, attr, f"{where}: record {i}"))
    return conversations


def load_conversations(dataset: Union[str, Sequence[str]], dataset_dir: Union[str, os.PathLike] = "data",
                       max_samples: Optional[int] = None) -> list[Conversation]:
    """Conversations of `dataset` ("a,b" or a list of dataset_info.json names), concatenated in order.
    `max_samples` applies to each dataset, as LLaMA-Factory's `--max_samples`."""
    names = [n.strip() for n in (dataset.split(",") if isinstance(dataset, str) else dataset) if n.strip()]
    if not names:
        raise Qwen2PureError("no dataset given (--dataset takes names registered in dataset_info.json)")
    if max_samples is not None and max_samples < 1:
        raise Qwen2PureError(f"max_samples must be >= 1, got {max_samples}")
    info = load_dataset_info(dataset_dir)
    conversations = []
    for name in names:
        if name not in info:
            raise Qwen2PureError(f"dataset {name!r} is not in {Path(dataset_dir) / 'dataset_info.json'} "
                                 f"(registered: {', '.join(sorted(info)) or 'none'})")
        part = load_dataset_records(info[name], dataset_dir, max_samples)
        if not part:
            raise Qwen2PureError(f"dataset {name!r} is empty ({info[name].file_name or info[name].load_from})")
        conversations.extend(part)
    return conversations


# ---------------------------------------------------------------------------------------------------------------
# Encoding: template, masking, cutoff_len
# ---------------------------------------------------------------------------------------------------------------

def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's `infer_seqlen`: how many prompt (source) and answer (target) tokens of one turn fit in
    `cutoff_len` tokens. A short answer is kept whole; else a short prompt is kept whole; else both are cut in
    proportion to their lengths."""
    if target_len * 2 < cutoff_len:  # truncate the source only
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # truncate the target only
        max_target_len = cutoff_len - source_len
    else:  # truncate both
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


def encode_pairs(conversation: Conversation, tokenizer, template: QwenTemplate) -> list[tuple[list, list]]:
    """(prompt ids, answer ids) for each user→assistant turn, as LLaMA-Factory's `Template.encode_multiturn`:
    each slot string is tokenized on its own; turn 0's prompt starts with the system block; later prompts
    start with the template's separator."""
    system = conversation.system or template.default_system
    pairs = []
    msgs = conversation.messages
    for turn in range(0, len(msgs), 2):
        user, answer = msgs[turn], msgs[turn + 1]
        source = []
        if turn == 0 and system:
            source += tokenizer.encode(template.system.replace("{content}", system))
        elif turn > 0 and template.separator:
            source += tokenizer.encode(template.separator)
        slot = template.observation if user["role"] == "observation" else template.user
        source += tokenizer.encode(slot.replace("{content}", user["content"]))
        target = tokenizer.encode(template.assistant.replace("{content}", answer["content"]))
        pairs.append((source, target))
    return pairs


def encode_supervised(conversation: Conversation, tokenizer, template: QwenTemplate, cutoff_len: int,
                      train_on_prompt: bool = False, mask_history: bool = False) -> tuple[list, list]:
    """(input_ids, labels) of one conversation, as LLaMA-Factory's `_encode_supervised_example` for the qwen
    template: prompts masked with -100 (unless `train_on_prompt`), every answer trained (only the last with
    `mask_history`, which also gives the last turns priority for the cutoff_len budget, as LLaMA-Factory HEAD),
    turns truncated in order with `infer_seqlen` until `cutoff_len` tokens are used."""
    pairs = encode_pairs(conversation, tokenizer, template)
    if mask_history:
        pairs = pairs[::-1]
    input_ids, labels = [], []
    total = 0
    for turn, (source, target) in enumerate(pairs):
        if total >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        source_labels = list(source) if train_on_prompt else [IGNORE_INDEX] * source_len
        target_labels = [IGNORE_INDEX] * target_len if (mask_history and turn != 0) else list(target)
        if mask_history:  # pairs were reversed: prepend to restore the order
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source + target
            labels += source_labels + target_labels
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------------------
# Packing and the train/eval split
# ---------------------------------------------------------------------------------------------------------------

def greedy_knapsack(numbers: list[int], capacity: int) -> list[list[int]]:
    """LLaMA-Factory's bin packing: sort ascending, fill each bin by repeatedly taking the largest length
    that still fits."""
    numbers = sorted(numbers)
    knapsacks = []
    while numbers:
        current, remaining = [], capacity
        while True:
            index = bisect.bisect(numbers, remaining) - 1
            if index < 0:
                break
            remaining -= numbers[index]
            current.append(numbers.pop(index))
        knapsacks.append(current)
    return knapsacks


def pack_examples(examples: Sequence[dict], cutoff_len: int, pad_token_id: int,
                  batch_size: int = 1000) -> list[dict]:
    """LLaMA-Factory v0.8.x `preprocess_packed_supervised_dataset`: within each batch of `batch_size` examples
    (its `datasets.map` batches), bin-pack by length into bins of at most `cutoff_len` tokens, concatenate, and
    pad every bin to exactly `cutoff_len` with `pad_token_id` (labels -100).

    Attention: like LLaMA-Factory's plain `packing`, the attention mask is 1 everywhere, padding included, so
    each token attends to the earlier samples of its bin (no block-diagonal mask), and positions run on across
    the bin. The padding is never trained (labels -100). Examples longer than cutoff_len are dropped (cannot
    happen after `encode_supervised`)."""
    packed = []
    for start in range(0, len(examples), batch_size):
        chunk = [e for e in examples[start:start + batch_size] if len(e["input_ids"]) <= cutoff_len]
        by_length: dict[int, list[int]] = {}
        for i, e in enumerate(chunk):
            by_length.setdefault(len(e["input_ids"]), []).append(i)
        for knapsack in greedy_knapsack([len(e["input_ids"]) for e in chunk], cutoff_len):
            ids, labels = [], []
            for length in knapsack:
                e = chunk[by_length[length].pop()]
                ids += e["input_ids"]
                labels += e["labels"]
            pad = cutoff_len - len(ids)
            packed.append({"input_ids": ids + [pad_token_id] * pad, "labels": labels + [IGNORE_INDEX] * pad,
                           "attention_mask": [1] * cutoff_len})
    return packed


def split_indices(n: int, val_size: float, seed: int = 42) -> tuple[list[int], list[int]]:
    """(train, eval) indices as `datasets.Dataset.train_test_split(test_size=val_size, seed=seed)`:
    val_size > 1 is a count, else a fraction (rounded up); one permutation from numpy's default_rng(seed),
    eval = its first part, train = the rest, both in permutation order."""
    import numpy as np

    if val_size > 1:
        if val_size != int(val_size):
            raise Qwen2PureError(f"val_size {val_size}: a value above 1 is a number of samples and must be whole")
        n_test = int(val_size)
    elif val_size > 0:
        n_test = math.ceil(val_size * n)
    else:
        raise Qwen2PureError(f"val_size must be > 0 to split, got {val_size}")
    n_train = n - n_test
    if n_test >= n or n_train <= 0:
        raise Qwen2PureError(f"val_size {val_size} leaves no training samples out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:].tolist(), perm[:n_test].tolist()


def split_dataset(examples: Sequence, val_size: float, seed: int = 42) -> tuple[list, list]:
    """(train, eval) lists; eval is empty when val_size is 0 (train is then the examples in order)."""
    if not val_size or val_size <= 1e-6:
        return list(examples), []
    train, val = split_indices(len(examples), val_size, seed)
    return [examples[i] for i in train], [examples[i] for i in val]


# ---------------------------------------------------------------------------------------------------------------
# Everything together, and the collator
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SFTData:
    """Encoded examples ({"input_ids", "labels"[, "attention_mask"]} lists) ready for `SFTCollator`."""

    train: list
    eval: list
    template: QwenTemplate


def build_sft_data(tokenizer, dataset: Union[str, Sequence[str]], dataset_dir: Union[str, os.PathLike] = "data",
                   cutoff_len: int = 1024, max_samples: Optional[int] = None, val_size: float = 0.0,
                   seed: int = 42, packing: bool = False, template: Union[str, QwenTemplate] = DEFAULT_TEMPLATE_VERSION,
                   default_system: Optional[str] = None, train_on_prompt: bool = False,
                   mask_history: bool = False) -> SFTData:
    """LLaMA-Factory's `get_dataset` for `--stage sft`: load, align, encode (and pack), then split.
    `tokenizer` is a qwen2_pure `Tokenizer` (anything with `.encode(text) -> ids` and `.pad_token_id`)."""
    if cutoff_len < 1:
        raise Qwen2PureError(f"cutoff_len must be >= 1, got {cutoff_len}")
    tmpl = get_template(template, default_system)
    conversations = load_conversations(dataset, dataset_dir, max_samples)
    examples = []
    for conv in conversations:
        input_ids, labels = encode_supervised(conv, tokenizer, tmpl, cutoff_len, train_on_prompt, mask_history)
        examples.append({"input_ids": input_ids, "labels": labels})
    if packing:
        examples = pack_examples(examples, cutoff_len, resolve_pad_token_id(tokenizer))
    train, val = split_dataset(examples, val_size, seed)
    return SFTData(train, val, tmpl)


def resolve_pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its eos (what LLaMA-Factory sets when a tokenizer has no pad token)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise Qwen2PureError("the tokenizer has neither a pad_token nor an eos_token to pad batches with")
    return int(pad)


class SFTCollator:
    """Pads a list of examples into tensors, right-padded like transformers' DataCollatorForSeq2Seq:
    input_ids with `pad_token_id`, attention_mask 0 and labels -100 on the padding. Lengths are rounded up to
    `pad_to_multiple_of` (LLaMA-Factory trains with 8). An example's own attention_mask (packing) is kept."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = 8, label_pad_id: int = IGNORE_INDEX):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id

    def __call__(self, batch: Sequence[dict]) -> dict:
        import torch

        if not batch:
            raise Qwen2PureError("SFTCollator: empty batch")
        length = max(len(e["input_ids"]) for e in batch)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), self.label_pad_id, dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e["input_ids"])
            if len(e["labels"]) != n:
                raise Qwen2PureError(f"SFTCollator: example {row} has {n} input_ids but {len(e['labels'])} labels")
            ids[row, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
            mask[row, :n] = torch.as_tensor(e["attention_mask"], dtype=torch.long) if "attention_mask" in e else 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
