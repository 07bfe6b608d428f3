"""SFT data (qwen2_pure.train.data): formats, dataset_info.json, the qwen template and masking as LLaMA-Factory,
cutoff_len truncation, packing, the train/eval split, errors, the collator.

The exact-ids tests build the expected (input_ids, labels) here from the template strings written out in full
(and, for the system prefix, from the Qwen2 ids listed in the reference notes), not from the module's helpers."""

import json
import sys

import pytest
import torch

from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.train.data import (
    IGNORE_INDEX,
    Conversation,
    SFTCollator,
    build_sft_data,
    encode_supervised,
    get_template,
    greedy_knapsack,
    infer_seqlen,
    load_conversations,
    load_dataset_info,
    pack_examples,
    split_dataset,
    split_indices,
)

IM_START, IM_END, NL = 151644, 151645, 198
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
SYSTEM_PREFIX_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
# "<|im_end|>\n<|im_start|>assistant\n"
ASSISTANT_HEADER_IDS = [151645, 198, 151644, 77091, 198]
DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tok(demo_tokenizer_dir):
    from qwen2_pure.tokenizer import Tokenizer
    return Tokenizer.from_dir(demo_tokenizer_dir)


class CharTokenizer:
    """One id per character (special tokens not parsed): enough for tests that only count tokens."""
    pad_token_id = 0
    eos_token_id = 1

    def encode(self, text):
        return [ord(c) for c in text]


def write_dataset(tmp_path, records, info_entry=None, name="d", file_name="d.json", jsonl=False):
    path = tmp_path / file_name
    if jsonl:
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    entry = {"file_name": file_name, **(info_entry or {})}
    info_path = tmp_path / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = entry
    info_path.write_text(json.dumps(info), encoding="utf-8")
    return path


def examples_of(tok, tmp_path, records, info_entry=None, cutoff_len=1024, **kw):
    write_dataset(tmp_path, records, info_entry)
    data = build_sft_data(tok, "d", tmp_path, cutoff_len=cutoff_len, **kw)
    return [(e["input_ids"], e["labels"]) for e in data.train]


def masked(ids):
    return [IGNORE_INDEX] * len(ids)


# ---- exact ids: alpaca ---------------------------------------------------------------------------------------

def test_alpaca_default_system_v08(tok, tmp_path):
    rec = {"instruction": "Name a color.", "input": "Pick a warm one.", "output": "Red."}
    (ids, labels), = examples_of(tok, tmp_path, [rec])
    # Qwen2's default system prompt, user content = instruction + "\n" + input
    prompt = SYSTEM_PREFIX_IDS + tok.encode("Name a color.\nPick a warm one.") + ASSISTANT_HEADER_IDS
    answer = tok.encode("Red.") + [IM_END]  # v0.8: the "\n" after <|im_end|> is not in the label
    assert ids == prompt + answer
    assert labels == masked(prompt) + answer
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName a color.\n"
            "Pick a warm one.<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>")
    assert tok.decode(ids) == text


def test_alpaca_system_column_and_empty_input(tok, tmp_path):
    rec = {"instruction": "Say hi.", "input": "", "output": "Hi!", "sys": "Be brief."}
    (ids, labels), = examples_of(tok, tmp_path, [rec], {"columns": {"system": "sys"}})
    prompt = tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    answer = tok.encode("Hi!") + [IM_END]
    assert ids == prompt + answer and labels == masked(prompt) + answer
    # "system" is a column only when dataset_info declares it (as LLaMA-Factory): here it is ignored
    (ids2, _), = examples_of(tok, tmp_path, [{"instruction": "Say hi.", "output": "Hi!", "system": "Be brief."}])
    assert ids2[:len(SYSTEM_PREFIX_IDS)] == SYSTEM_PREFIX_IDS


def test_alpaca_history_every_turn_trained_v08(tok, tmp_path):
    rec = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]}
    (ids, labels), = examples_of(tok, tmp_path, [rec], {"columns": {"history": "history"}})
    p0 = SYSTEM_PREFIX_IDS + tok.encode("1+1?") + ASSISTANT_HEADER_IDS
    a0 = tok.encode("2") + [IM_END]
    # turns >= 2 start with the "\n" separator (masked) in v0.8
    p1 = [NL] + tok.encode("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    a1 = tok.encode("4") + [IM_END]
    p2 = [NL] + tok.encode("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    a2 = tok.encode("6") + [IM_END]
    assert ids == p0 + a0 + p1 + a1 + p2 + a2
    assert labels == masked(p0) + a0 + masked(p1) + a1 + masked(p2) + a2


def test_v092_and_v093_layout_equals_official_chat_template(tok, tmp_path):
    rec = {"instruction": "Q1", "output": "A1", "history": [["Q0", "A0"]]}
    entry = {"columns": {"history": "history"}}
    for version, system in (("0.9.2", DEFAULT_SYSTEM),
                            ("0.9.3", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")):
        (ids, labels), = examples_of(tok, tmp_path, [rec], entry, template=version)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Q0"},
                    {"role": "assistant", "content": "A0"}, {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"}]
        # the tokenizer's own Jinja template gives the same text in the v0.9.2+ layout
        assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
        a0, a1 = tok.encode("A0") + [IM_END, NL], tok.encode("A1") + [IM_END, NL]  # "\n" trained since v0.9.2
        p1 = tok.encode("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n")
        p0 = ids[:len(ids) - len(a0) - len(p1) - len(a1)]
        assert ids == p0 + a0 + p1 + a1
        assert labels == masked(p0) + a0 + masked(p1) + a1


def test_default_system_parameter(tok, tmp_path):
    (ids, _), = examples_of(tok, tmp_path, [{"instruction": "x", "output": "y"}], default_system="Custom.")
    head = tok.encode("<|im_start|>system\nCustom.<|im_end|>\n")
    assert ids[:len(head)] == head
    assert get_template("0.8").default_system == DEFAULT_SYSTEM
    assert get_template("v0.8.3").name == "0.8" and get_template("0.9.4").name == "0.9.3"
    with pytest.raises(Qwen2PureError, match="template version"):
        get_template("1.7")


# ---- exact ids: sharegpt / OpenAI messages ---------------------------------------------------------------------

def test_sharegpt_multiturn_with_system_message(tok, tmp_path):
    rec = {"conversations": [{"from": "system", "value": "S."}, {"from": "human", "value": "U0"},
                             {"from": "gpt", "value": "A0"}, {"from": "human", "value": "U1"},
                             {"from": "gpt", "value": "A1"}]}
    (ids, labels), = examples_of(tok, tmp_path, [rec], {"formatting": "sharegpt"})
    p0 = tok.encode("<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nU0<|im_end|>\n<|im_start|>assistant\n")
    a0 = tok.encode("A0") + [IM_END]
    p1 = tok.encode("\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n")
    a1 = tok.encode("A1") + [IM_END]
    assert ids == p0 + a0 + p1 + a1
    assert labels == masked(p0) + a0 + masked(p1) + a1


def test_openai_messages_format_and_system_column(tok, tmp_path):
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages", "system": "sys"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                      "assistant_tag": "assistant", "system_tag": "system"}}
    recs = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"sys": "Col.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    (ids0, labels0), (ids1, _) = examples_of(tok, tmp_path, recs, entry)
    p0 = SYSTEM_PREFIX_IDS + tok.encode("Hi") + ASSISTANT_HEADER_IDS
    assert ids0 == p0 + tok.encode("Hello") + [IM_END]
    assert labels0 == masked(p0) + tok.encode("Hello") + [IM_END]
    assert ids1[:len(tok.encode("<|im_start|>system\nCol.<|im_end|>\n"))] == \
        tok.encode("<|im_start|>system\nCol.<|im_end|>\n")


def test_jsonl_file_and_max_samples(tok, tmp_path):
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    write_dataset(tmp_path, recs, file_name="d.jsonl", jsonl=True)
    convs = load_conversations("d", tmp_path, max_samples=3)
    assert [c.messages[0]["content"] for c in convs] == ["q0", "q1", "q2"]
    write_dataset(tmp_path, recs[:2], name="e", file_name="e.json")
    convs = load_conversations("d,e", tmp_path, max_samples=4)  # max_samples is per dataset
    assert [c.messages[0]["content"] for c in convs] == ["q0", "q1", "q2", "q3", "q0", "q1"]


# ---- cutoff_len --------------------------------------------------------------------------------------------------

def test_infer_seqlen_branches():
    # target short (2*10 < 100): kept whole, source gets the rest
    assert infer_seqlen(200, 10, 100) == (90, 10)
    # target long, source short (2*10 < 50): target gets 50 - 10
    assert infer_seqlen(10, 100, 50) == (10, 40)
    # both long: target gets int(30 * 40 / 60) = 20, source the remaining 10
    assert infer_seqlen(20, 40, 30) == (10, 20)
    # both long, odd split: int(25 * 30 / 80) = 9 -> source 16
    assert infer_seqlen(50, 30, 25) == (16, 9)
    assert infer_seqlen(3, 4, 100) == (3, 4)


def test_long_sample_truncated_like_llamafactory(tok):
    tmpl = get_template("0.8")
    user = " ".join(f"word{i}" for i in range(12))
    answer = " ".join(f"reply{i}" for i in range(30))
    conv = Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    source = SYSTEM_PREFIX_IDS + tok.encode(user) + ASSISTANT_HEADER_IDS
    target = tok.encode(answer) + [IM_END]
    cutoff = 40
    assert 2 * len(target) >= cutoff and 2 * len(source) >= cutoff  # the "truncate both" branch
    t = int(cutoff * len(target) / (len(source) + len(target)))
    s = cutoff - t
    ids, labels = encode_supervised(conv, tok, tmpl, cutoff)
    assert len(ids) == cutoff
    assert ids == source[:s] + target[:t]  # both keep their beginnings; the target loses its <|im_end|>
    assert labels == masked(source[:s]) + target[:t]
    assert IM_END not in labels


def test_multiturn_budget_turn_by_turn():
    tok = CharTokenizer()
    tmpl = get_template("0.8", default_system="")  # no system block: source = user slot only
    conv = Conversation([{"role": "user", "content": "u" * 10}, {"role": "assistant", "content": "a" * 10},
                         {"role": "user", "content": "v" * 10}, {"role": "assistant", "content": "b" * 40},
                         {"role": "user", "content": "w"}, {"role": "assistant", "content": "c"}])
    pairs = [(tok.encode(f"<|im_start|>user\n{'u' * 10}<|im_end|>\n<|im_start|>assistant\n"),
              tok.encode("a" * 10 + "<|im_end|>")),
             (tok.encode(f"\n<|im_start|>user\n{'v' * 10}<|im_end|>\n<|im_start|>assistant\n"),
              tok.encode("b" * 40 + "<|im_end|>"))]
    (s0, t0), (s1, t1) = pairs
    cutoff = len(s0) + len(t0) + 40
    ids, labels = encode_supervised(conv, tok, tmpl, cutoff)
    # turn 0 fits whole; turn 1 gets 40 tokens: |t1|=50, |s1|=61, both >= 20 -> target int(40*50/111)=18
    assert (len(s1), len(t1)) == (61, 50)
    assert ids == s0 + t0 + s1[:22] + t1[:18]
    assert labels == masked(s0) + t0 + masked(s1[:22]) + t1[:18]  # and the third turn is dropped
    # mask_history (LLaMA-Factory HEAD): only the last answer trained, the last turns get the budget first
    ids_h, labels_h = encode_supervised(conv, tok, tmpl, 10_000, mask_history=True)
    s2, t2 = tok.encode("\n<|im_start|>user\nw<|im_end|>\n<|im_start|>assistant\n"), tok.encode("c<|im_end|>")
    assert ids_h == s0 + t0 + s1 + t1 + s2 + t2
    assert labels_h == masked(s0 + t0 + s1 + t1 + s2) + t2


# ---- packing -----------------------------------------------------------------------------------------------------

def test_greedy_knapsack():
    assert greedy_knapsack([5, 3, 8, 2, 7], 10) == [[8, 2], [7, 3], [5]]


def test_packing(tok, tmp_path):
    recs = [{"instruction": "q" * n, "output": "a"} for n in (1, 5, 9)]
    tok_c = CharTokenizer()
    write_dataset(tmp_path, recs)
    plain = build_sft_data(tok_c, "d", tmp_path, cutoff_len=10_000).train
    lengths = [len(e["input_ids"]) for e in plain]
    cutoff = lengths[2] + lengths[0] + 3  # the longest and the shortest share a bin, the middle one is alone
    assert lengths[1] + lengths[2] > cutoff
    packed = build_sft_data(tok_c, "d", tmp_path, cutoff_len=cutoff, packing=True).train
    assert len(packed) == 2
    bin0, bin1 = packed
    assert bin0["input_ids"] == plain[2]["input_ids"] + plain[0]["input_ids"] + [0, 0, 0]
    assert bin0["labels"] == plain[2]["labels"] + plain[0]["labels"] + masked([0, 0, 0])
    assert bin0["attention_mask"] == [1] * cutoff  # plain packing: samples attend across each other
    assert bin1["input_ids"][:lengths[1]] == plain[1]["input_ids"]
    assert all(len(b["input_ids"]) == len(b["labels"]) == cutoff for b in packed)
    # the collator keeps the packed attention mask
    batch = SFTCollator(0, pad_to_multiple_of=None)(packed)
    assert batch["attention_mask"].all()


def test_pack_examples_pads_with_pad_id():
    ex = [{"input_ids": [7, 7], "labels": [-100, 7]}, {"input_ids": [9] * 4, "labels": [9] * 4}]
    packed = pack_examples(ex, cutoff_len=8, pad_token_id=5)
    assert packed == [{"input_ids": [9, 9, 9, 9, 7, 7, 5, 5], "labels": [9, 9, 9, 9, -100, 7, -100, -100],
                       "attention_mask": [1] * 8}]


# ---- train/eval split ------------------------------------------------------------------------------------------

def test_split_reproducible_and_disjoint():
    import numpy as np

    items = list(range(101))
    train, val = split_dataset(items, 0.1, seed=42)
    assert len(val) == 11 and len(train) == 90  # ceil(0.1 * 101) eval samples
    assert sorted(train + val) == items and not set(train) & set(val)
    assert split_dataset(items, 0.1, seed=42) == (train, val)
    assert split_dataset(items, 0.1, seed=7) != (train, val)
    perm = np.random.default_rng(42).permutation(101).tolist()  # datasets' train_test_split algorithm
    assert val == perm[:11] and train == perm[11:]
    train_n, val_n = split_dataset(items, 5, seed=1)  # a count
    assert len(val_n) == 5 and len(train_n) == 96
    assert split_dataset(items, 0.0) == (items, [])
    with pytest.raises(Qwen2PureError, match="no training samples"):
        split_indices(3, 3)


def test_split_matches_datasets_library():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"i": list(range(57))}).train_test_split(test_size=0.1, seed=42)
    train, val = split_dataset(list(range(57)), 0.1, seed=42)
    assert train == ds["train"]["i"] and val == ds["test"]["i"]


def test_build_sft_data_split(tmp_path):
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    write_dataset(tmp_path, recs)
    a = build_sft_data(CharTokenizer(), "d", tmp_path, val_size=0.1, seed=3)
    b = build_sft_data(CharTokenizer(), "d", tmp_path, val_size=0.1, seed=3)
    assert len(a.eval) == 2 and len(a.train) == 18 and a.train == b.train and a.eval == b.eval
    keys = {tuple(e["input_ids"]) for e in a.train}
    assert not keys & {tuple(e["input_ids"]) for e in a.eval}


# ---- dataset_info.json -------------------------------------------------------------------------------------------

def test_dataset_info_parsing(tmp_path):
    info = {
        "a": {"file_name": "a.json", "columns": {"prompt": "q", "response": "r", "system": "s", "history": "h"}},
        "s": {"file_name": "s.jsonl", "formatting": "sharegpt", "columns": {"messages": "msgs"},
              "tags": {"role_tag": "role", "user_tag": "me"}},
        "hub": {"hf_hub_url": "org/x", "ms_hub_url": "org/y", "subset": "zh", "split": "dev"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    attrs = load_dataset_info(tmp_path)
    a = attrs["a"]
    assert a.load_from == "file" and a.formatting == "alpaca"
    assert a.columns == {"prompt": "q", "query": "input", "response": "r", "system": "s", "history": "h"}
    s = attrs["s"]
    assert s.columns == {"messages": "msgs"}
    assert s.tags["role_tag"] == "role" and s.tags["user_tag"] == "me" and s.tags["assistant_tag"] == "gpt"
    hub = attrs["hub"]
    assert (hub.load_from, hub.hf_hub_url, hub.subset, hub.split) == ("hf_hub", "org/x", "zh", "dev")


def test_column_mapping_reads_renamed_fields(tmp_path):
    recs = [{"q": "Q", "extra": "E", "r": "R", "h": [["q0", "r0"]], "s": "Sys"}]
    write_dataset(tmp_path, recs, {"columns": {"prompt": "q", "query": "extra", "response": "r",
                                                "history": "h", "system": "s"}})
    conv, = load_conversations("d", tmp_path)
    assert conv.system == "Sys"
    assert conv.messages == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "r0"},
                             {"role": "user", "content": "Q\nE"}, {"role": "assistant", "content": "R"}]


def test_repo_demo_dataset(tok):
    from pathlib import Path
    data_dir = Path(__file__).resolve().parents[1] / "data"
    convs = load_conversations("qwen2_pure_demo", data_dir)
    assert 60 <= len(convs) <= 100
    data = build_sft_data(tok, "qwen2_pure_demo", data_dir, cutoff_len=256, val_size=0.1, seed=42)
    assert len(data.eval) == 7 and len(data.train) == len(convs) - 7
    for e in data.train:
        assert e["input_ids"][:len(SYSTEM_PREFIX_IDS)] == SYSTEM_PREFIX_IDS
        assert e["labels"][-1] == IM_END
    assert load_dataset_info(data_dir)["alpaca_zh"].hf_hub_url == "llamafactory/alpaca_zh"


# ---- errors ------------------------------------------------------------------------------------------------------

def test_malformed_record_names_file_and_index(tmp_path):
    path = write_dataset(tmp_path, [{"instruction": "ok", "output": "ok"}, {"instruction": "no output"}])
    with pytest.raises(Qwen2PureError, match=rf"{path.name}: record 1: missing the 'output' field"):
        load_conversations("d", tmp_path)
    write_dataset(tmp_path, [{"instruction": "a", "output": 3}])
    with pytest.raises(Qwen2PureError, match="record 0: 'output' must be a string"):
        load_conversations("d", tmp_path)
    bad_roles = {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}
    ok = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}
    write_dataset(tmp_path, [ok, ok, bad_roles], {"formatting": "sharegpt"})
    with pytest.raises(Qwen2PureError, match="record 2: message 0 has role 'gpt'"):
        load_conversations("d", tmp_path)
    write_dataset(tmp_path, [{"conversations": [{"from": "human", "value": "x"}]}], {"formatting": "sharegpt"})
    with pytest.raises(Qwen2PureError, match="record 0: 1 messages"):
        load_conversations("d", tmp_path)
    (tmp_path / "j.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    write_dataset(tmp_path, [], name="j", file_name="x.json")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["j"] = {"file_name": "j.jsonl"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(Qwen2PureError, match=r"j.jsonl: line 2 \(record 1\) is not valid JSON"):
        load_conversations("j", tmp_path)


def test_empty_and_missing(tmp_path):
    write_dataset(tmp_path, [])
    with pytest.raises(Qwen2PureError, match="dataset 'd' is empty"):
        load_conversations("d", tmp_path)
    with pytest.raises(Qwen2PureError, match="'nope' is not in"):
        load_conversations("nope", tmp_path)
    info = {"gone": {"file_name": "gone.json"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(Qwen2PureError, match="gone.json: file of dataset 'gone' not found"):
        load_conversations("gone", tmp_path)
    with pytest.raises(Qwen2PureError, match="dataset_info.json: file not found"):
        load_conversations("d", tmp_path / "nowhere")


def test_hub_only_entry_offline(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path
    data_dir = Path(__file__).resolve().parents[1] / "data"
    shutil.copy(data_dir / "dataset_info.json", tmp_path / "dataset_info.json")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails, as when it is not installed
    with pytest.raises(Qwen2PureError, match=r"alpaca_zh.*llamafactory/alpaca_zh.*datasets package.*file_name"):
        load_conversations("alpaca_zh", tmp_path)
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(Qwen2PureError, match=r"ModelScope 'llamafactory/alpaca_zh'.*modelscope package"):
        load_conversations("alpaca_zh", tmp_path)


# ---- collator ----------------------------------------------------------------------------------------------------

def test_collator_right_pads():
    batch = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    out = SFTCollator(pad_token_id=0, pad_to_multiple_of=None)(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    out8 = SFTCollator(pad_token_id=9)(batch)  # LLaMA-Factory pads to a multiple of 8 in training
    assert out8["input_ids"].shape == (2, 8) and out8["labels"][0, 3:].eq(-100).all()
    assert out8["input_ids"][1, 1:].eq(9).all()


def test_hub_entry_fetched_through_datasets(tmp_path, monkeypatch):
    import types
    calls = []

    def load_dataset(path, name=None, data_dir=None, split="train"):
        calls.append((path, name, data_dir, split))
        if path == "org/down":
            raise ConnectionError("offline")
        return [{"instruction": "Hi", "input": "", "output": "Hello"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"up": {"hf_hub_url": "org/up"},
                                                            "down": {"hf_hub_url": "org/down"}}))
    conv, = load_conversations("up", tmp_path)
    assert calls == [("org/up", None, None, "train")]
    assert conv.messages[1] == {"role": "assistant", "content": "Hello"}
    with pytest.raises(Qwen2PureError, match=r"'org/down' and could not be fetched: ConnectionError: offline"):
        load_conversations("down", tmp_path)


def test_folder_file_name_reads_every_file(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"instruction": "q0", "output": "a0"}]))
    (folder / "b.jsonl").write_text(json.dumps({"instruction": "q1", "output": "a1"}) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "parts"}}))
    assert [c.messages[0]["content"] for c in load_conversations("p", tmp_path)] == ["q0", "q1"]
