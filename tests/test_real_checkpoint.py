"""The real checkpoint (Qwen2.5-Coder-0.5B-Instruct, from the `demo` extra) against transformers, in fp32.

The GGUF is assembled, verified and converted once into the cache folder; transformers then loads that
folder and so do we. The figures (max |Δlogit|, agreement) are written to artifacts/real_checkpoint.json.
"""

import json
import os
from pathlib import Path

import pytest
import torch

import qwen2_pure as q
from hf_utils import assert_distance_within, assert_same_op_order, grouped_gemms_exact, max_diff

transformers = pytest.importorskip("transformers")


def load_hf(demo_dir, dtype, attn="eager"):
    return transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=dtype, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def demo_dir():
    try:
        from qwen2_pure.loading.demo import demo_model_dir
        return demo_model_dir(progress=False)
    except (ImportError, q.Qwen2PureError) as e:
        pytest.skip(f"demo checkpoint not available: {e}")


@pytest.fixture(scope="module")
def pair(demo_dir):
    hf = load_hf(demo_dir, torch.float32)
    ours = q.load_model(demo_dir, dtype=torch.float32)
    tok = q.load_tokenizer(demo_dir)
    return hf, ours, tok


def test_64_greedy_tokens_identical_to_transformers(pair, demo_dir):
    hf, ours, tok = pair
    messages = [{"role": "user", "content": "Explain what this does:\n\ndef merge_sorted(a, b):\n"
                 "    out = []\n    while a and b:\n        out.append((a if a[0] < b[0] else b).pop(0))\n"
                 "    return out + a + b"}]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    x = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                          top_k=None, top_p=None, temperature=None, eos_token_id=None,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    got = q.generate(ours, [prompt], max_new_tokens=64, stop_token_ids=[])[0]
    # logits over prompt + answer, full forward on both sides
    seq = torch.tensor([prompt + ref])
    with torch.no_grad():
        a, b = ours(seq)[0], hf(seq).logits[0]
    delta = (a - b).abs().max().item()
    record = {"checkpoint": str(demo_dir), "prompt_tokens": len(prompt), "new_tokens": 64,
              "identical_tokens": sum(x == y for x, y in zip(got, ref)), "max_abs_logit_delta": delta,
              "max_abs_logit": b.abs().max().item(), "transformers": transformers.__version__,
              "torch": torch.__version__, "text": tok.decode(got, skip_special_tokens=True)}
    out = Path(os.environ.get("QWEN2_PURE_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_checkpoint.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    print(f"\nreal checkpoint: max |Δlogit| = {delta:.3e} over {seq.shape[1]} positions")
    assert got == ref
    assert "merge" in record["text"].lower() or "sort" in record["text"].lower()  # a coherent answer
    # 24 fp32 layers in the same op order: bit for bit where this machine's GEMMs allow it (0.0 on an AVX-512
    # Xeon), else no further from transformers' eager logits than its own SDPA ones
    with torch.no_grad():
        assert_same_op_order(a, b, lambda: load_hf(demo_dir, torch.float32, "sdpa")(seq).logits[0],
                             model=ours, ids=seq, what="the real checkpoint's fp32 logits")


def test_tools_parity_bf16(demo_dir):
    """tools/parity.py on the real checkpoint in bf16: the same op order gives the same bf16 logits."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tools" / "parity.py"), "--model", str(demo_dir), "--dtype",
                        "bfloat16", "--new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["identical_greedy_prefix"] == "8/8"
    assert report["top1_agreement"] == 1.0
    delta = report["max_abs_logit_delta"]
    cfg = q.Qwen2Config.from_dict(json.loads((demo_dir / "config.json").read_text()))
    if grouped_gemms_exact(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 1, report["positions"],
                           torch.bfloat16):
        assert delta == 0.0  # 0.0 on an AVX-512/AMX Xeon, with AVX-512 and AVX2 kernels
    else:  # this machine's GEMMs round by shape: no further than transformers' own eager vs SDPA, here
        x = torch.arange(1000, 1000 + report["positions"])[None]
        with torch.no_grad():
            spread = max_diff(*(load_hf(demo_dir, torch.bfloat16, attn)(x).logits for attn in ("eager", "sdpa")))
        assert_distance_within(delta, spread, report["max_abs_logit"], what="tools/parity.py bf16 logits")


def test_lora_training_steps_on_the_real_checkpoint(demo_dir, tmp_path):
    """Three LoRA SFT steps on the real model (CPU, fp32): finite, decreasing-on-average losses, files written."""
    from qwen2_pure.train.args import parse_train_args
    from qwen2_pure.train.trainer import train
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sft"
    state = train(parse_train_args([
        "--stage", "sft", "--model_name_or_path", str(demo_dir), "--dataset_dir", str(root / "data"),
        "--dataset", "qwen2_pure_demo", "--max_samples", "4", "--cutoff_len", "96", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_steps", "3", "--lora_target", "q_proj,v_proj", "--output_dir", str(out)]), progress=False)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert losses[-1] < losses[0]  # the same 4 examples each step: the adapter fits them
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-3").is_dir()


def test_demo_generation_config_ids_match_the_gguf():
    """The demo's GENERATION_CONFIG (Qwen's published file) stops and pads on the ids the GGUF itself names."""
    from qwen2_pure.loading.demo import GENERATION_CONFIG, demo_gguf_path
    from qwen2_pure.loading.gguf import open_gguf
    from qwen2_pure.loading.gguf_tokenizer import gguf_tokenizer_files
    try:
        path = demo_gguf_path(progress=False)
    except (ImportError, q.Qwen2PureError) as e:
        pytest.skip(f"demo checkpoint not available: {e}")
    ids = gguf_tokenizer_files(open_gguf(path))[2]
    assert ids and {k: GENERATION_CONFIG[k] for k in ids} == ids


def test_demo_loads_from_its_gguf_as_the_converted_folder(demo_dir):
    """load() without a source reads the GGUF (no converted copy) with the official sampling defaults, and its
    weights are bit for bit those of the fp32 folder the transformers comparisons above use."""
    from qwen2_pure.loading.safetensors_io import SafetensorsFile
    loaded = q.load()
    assert loaded.source.endswith("qwen2.5-coder-0.5b-instruct.gguf")
    assert loaded.generation_config.sampling == q.SamplingParams(temperature=0.7, top_k=20, top_p=0.8,
                                                                  repetition_penalty=1.05)
    assert loaded.generation_config.eos_token_id == (151645, 151643)
    assert json.loads((demo_dir / "generation_config.json").read_text()) == loaded.generation_config.raw
    state = loaded.model.state_dict()
    with SafetensorsFile(demo_dir / "model.safetensors") as f:
        assert set(f.names()) == set(state)
        for name in f.names():
            assert torch.equal(state[name], f.get(name)), name
            f.release(name)
