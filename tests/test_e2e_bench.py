"""benchmarks/e2e.py: the roofline formulas against a hand count, the decode rate when noise swamps it, and a smoke
run on a tiny checkpoint that checks the output's structure and sanity (finite, positive, ordered), never a speed."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import e2e  # noqa: E402  (standard library only at import time)

# the tiny config of make_chat_checkpoint: hidden 32 = 2 query heads of 16, 1 KV head, 1 layer, MLP 64
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 151936, "tie_word_embeddings": True}


def test_linear_params_hand_count():
    # q 32·32, k 32·16, v 32·16, o 32·32, gate/up/down 32·64 each
    assert e2e.linear_params(TINY) == {
        "decoder": 1024 + 512 + 512 + 1024 + 3 * 2048, "bias": 32 + 16 + 16, "lm_head": 151936 * 32,
        "rows": 32 + 16 + 16 + 32 + 64 + 64 + 32 + 151936}


def test_linear_params_match_the_model():
    torch = pytest.importorskip("torch")
    from qwen2_pure import Qwen2Config, Qwen2ForCausalLM
    cfg = {**TINY, "num_hidden_layers": 3, "num_attention_heads": 7, "num_key_value_heads": 7, "hidden_size": 112,
           "intermediate_size": 96, "vocab_size": 300, "tie_word_embeddings": False, "model_type": "qwen2"}
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config.from_dict(cfg))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    p = e2e.linear_params(cfg)
    assert sum(m.weight.numel() for m in linears) == p["decoder"] + p["lm_head"]
    assert sum(m.bias.numel() for m in linears if m.bias is not None) == p["bias"]
    assert sum(m.out_features for m in linears) == p["rows"]


def test_decode_bytes_hand_count():
    w = 9216 + 151936 * 32  # decoder linears + lm_head
    assert e2e.decode_bytes_per_token(TINY, "float32") == w * 4 + 64 * 4
    assert e2e.decode_bytes_per_token(TINY, "bfloat16") == w * 2 + 64 * 2
    assert e2e.decode_bytes_per_token(TINY, "int8") == w + (256 + 151936) * 4 + 64 * 2   # an fp32 scale per row
    assert e2e.decode_bytes_per_token(TINY, "int8", "float32") == w + (256 + 151936) * 4 + 64 * 4
    # decoder: 4 bits + a bf16 scale and zero per 32 inputs; lm_head: int8 + an fp32 scale per row
    assert e2e.decode_bytes_per_token(TINY, "int4") == 9216 / 2 + 9216 / 32 * 4 + 151936 * (32 + 4) + 64 * 2
    with pytest.raises(ValueError):
        e2e.decode_bytes_per_token(TINY, "int3")


def test_prefill_flops_hand_count():
    T = 16
    # attention: token t sees t+1 keys; QKᵀ and AV cost 2·D each per key and query head
    attention = sum(4 * 16 * 2 * (t + 1) for t in range(T)) / T
    assert attention == 1088
    assert e2e.prefill_flops_per_token(TINY, T) == pytest.approx(2 * 9216 + attention + 2 * 151936 * 32 / T)


def test_variant_parsing():
    assert e2e.parse_ours("float32") == {"kwargs": {"dtype": "float32"}, "storage": "float32", "compute": "float32"}
    assert e2e.parse_ours("bfloat16+compile")["kwargs"] == {"dtype": "bfloat16", "compile": True}
    assert e2e.parse_ours("int8") == {"kwargs": {"quantize": "int8", "dtype": "bfloat16"}, "storage": "int8",
                                      "compute": "best"}
    assert e2e.parse_ours("int4:float32+compile")["kwargs"] == {"quantize": "int4", "dtype": "float32",
                                                                "compile": True}
    assert e2e.parse_llama("q4_k_m+fa") == {"gguf": "q4_k_m", "flash_attn": True}
    for bad in ("int8+fast", "float8", "int4:int8"):
        with pytest.raises(ValueError):
            e2e.parse_ours(bad)
    with pytest.raises(ValueError):
        e2e.parse_llama("q8_0")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def bad_figure(text: str):
    """A negative or infinite figure printed in `text`, or None."""
    return re.search(r"(^|[\s(])-\d|\binf\b|\bnan\b", text, flags=re.IGNORECASE | re.MULTILINE)


def check_rates(r: dict) -> None:
    """Structure and sanity of one engine's figures, never their size: a 4-token run on a shared machine is noise.
    Every figure finite and positive; ranges ordered around their medians; a decode rate may be missing (None,
    noise swamped the difference of the two runs) but never negative or infinite."""
    where = (r["engine"], r["variant"])
    for key in ("prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb", "decode_roofline_tok_s", "prefill_roofline_tok_s",
                "prefill_pct_roofline"):
        assert positive(r[key]), (where, key, r[key])
    for key in ("ttft_s", "prefill_tok_s"):
        lo, hi = r[f"{key}_range"]
        assert positive(lo) and lo <= r[key] <= hi, (where, key, r[key], lo, hi)
    assert r["decode_noise_repeats"] == sum(x is None for x in r["samples"]["decode"])
    assert all(x is None or positive(x) for x in r["samples"]["decode"]), (where, r["samples"]["decode"])
    if r["decode_tok_s"] is None:
        assert r["decode_pct_roofline"] is None, where
    else:
        assert positive(r["decode_tok_s"]) and positive(r["decode_pct_roofline"]), (where, r["decode_tok_s"])
    if r["decode_tok_s_range"] is not None:
        lo, hi = r["decode_tok_s_range"]
        assert positive(lo) and lo <= hi, (where, lo, hi)


def test_decode_rate_is_never_negative_or_infinite(tmp_path):
    assert e2e.decode_rate(4, 0.5) == 6.0
    assert e2e.decode_rate(4, 0.0) is None and e2e.decode_rate(4, -0.02) is None  # N-token run no slower: noise
    info = {"load_s": 1.0, "warmup_s": 1.0, "rss_after_load_mb": 100.0, "peak_rss_mb": 120.0}
    ttft, total = [0.10, 0.12, 0.11], [0.40, 0.09, 0.50]  # the second repeat: the 4-token run was faster
    samples = {"ttft": ttft, "total": total, "decode": [e2e.decode_rate(4, t - f) for t, f in zip(total, ttft)]}
    r = e2e.summarize("qwen2-pure", "float32", samples, info, 16, 4)
    assert r["decode_noise_repeats"] == 1 and r["decode_tok_s"] == pytest.approx(3 / 0.3)  # median decode time
    assert r["decode_tok_s_range"] == pytest.approx([3 / 0.39, 3 / 0.3])
    all_noise = e2e.summarize("transformers", "float32", {"ttft": [0.1], "total": [0.1], "decode": [None]}, info, 16, 4)
    assert all_noise["decode_tok_s"] is None and all_noise["decode_tok_s_range"] is None
    for x in (r, all_noise):
        x.update(decode_pct_roofline=None if x["decode_tok_s"] is None else 1.0, prefill_pct_roofline=1.0)
    table = e2e.table([r, all_noise])
    assert "1 of 3 repeats n/a" in table and "| n/a (noise) |" in table and not bad_figure(table)
    assert e2e.ratios([r, all_noise])[0]["decode"] is None
    for x in (r, all_noise):
        x.update(decode_roofline_tok_s=100.0, prefill_roofline_tok_s=1000.0)
    pytest.importorskip("matplotlib")
    e2e.plot([r, all_noise], tmp_path / "noise.png", "a decode rate noise swamped")  # no bar, the words instead
    assert (tmp_path / "noise.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def tiny_dir(demo_tokenizer_dir, tmp_path_factory):
    from hf_utils import make_chat_checkpoint
    return make_chat_checkpoint(tmp_path_factory.mktemp("e2e_tiny"), demo_tokenizer_dir, max_new_tokens=8)


def test_smoke_run(tiny_dir, tmp_path):
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--model", str(tiny_dir),
                        "--ours", "float32", "--transformers", "float32", "--llama", "--prompt-tokens", "16",
                        "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--bandwidth-mib", "64",
                        "--out", str(out), "--plot", str(png)],
                       capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get(
                           "PYTHONPATH")]))})  # this checkout's package, installed or not
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(r["engine"], r["variant"]) for r in data["results"]] == [("qwen2-pure", "float32"),
                                                                       ("transformers", "float32")]
    for r in data["results"]:
        check_rates(r)
        assert r["peak_rss_mb"] >= r["rss_after_load_mb"] > 50  # torch alone is more than 50 MB
        assert len(r["samples"]["ttft"]) == len(r["samples"]["total"]) == len(r["samples"]["decode"]) == 1
        assert r["bytes_per_token"] == e2e.decode_bytes_per_token(TINY, "float32")
        assert len(r["tokens"]) == 4 and r["same_tokens_as_first"] == 4  # fp32, same ids: the same greedy tokens
    for m in data["machine"].values():
        assert positive(m["read_gb_s"]) and all(positive(m["matmul_gflop_s"][k]) for k in ("float32", "bfloat16"))
    for ratio in data["ratios"]:
        assert positive(ratio["prefill"]) and (ratio["decode"] is None or positive(ratio["decode"])), ratio
    meta = data["meta"]
    assert meta["threads"] == 1 and meta["prompt_tokens"] == 16 and meta["new_tokens"] == 4
    # the listed flags are keys, True or False: any CPU
    assert meta["cpu_model"] and "avx512f" in meta["cpu_flags"] and "transformers" in meta["versions"]
    assert "| engine | variant | prefill tok/s (min–max) |" in p.stdout
    assert "| qwen2-pure | float32 |" in p.stdout and "| transformers | float32 |" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("ours float32 / transformers float32: prefill ")
    ours = "\n".join(line for line in p.stderr.splitlines() if line.startswith(("[repeat", "machine", "warning")))
    assert not bad_figure(p.stdout) and not bad_figure(ours), p.stdout + ours  # e2e's own lines, not libraries'
    assert "[repeat 1/1] qwen2-pure float32" in p.stderr
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
