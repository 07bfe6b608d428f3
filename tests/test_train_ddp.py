"""Data-parallel training under torchrun: 2 processes (gloo, CPU) with per_device_train_batch_size 2 give the
same losses, eval losses, gradient norms and adapter as 1 process with per_device_train_batch_size 4."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen2_pure.train.args import parse_train_args
from qwen2_pure.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

SCRIPT = """
import json, sys
from qwen2_pure.train.args import parse_train_args
from qwen2_pure.train.trainer import train
train(parse_train_args(json.load(open(sys.argv[1]))), progress=False)
"""


@pytest.fixture(scope="module")
def base_dir(demo_tokenizer_dir, tmp_path_factory):
    from hf_utils import make_hf_checkpoint
    d = tmp_path_factory.mktemp("ddp_base")
    make_hf_checkpoint(d, heads=2, kv_heads=1, head_dim=16, layers=2, tied=True, intermediate=64, vocab=151936,
                       seed=0, max_pos=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_tokenizer_dir / name, d / name)
    return d


def argv_for(base_dir, out, batch, *extra):
    return ["--stage", "sft", "--do_train", "True", "--model_name_or_path", str(base_dir), "--finetuning_type",
            "lora", "--template", "qwen", "--dataset_dir", str(ROOT / "data"), "--dataset", "qwen2_pure_demo",
            "--cutoff_len", "64", "--learning_rate", "2e-2", "--max_samples", "22", "--max_steps", "3",
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "2",
            "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--save_steps", "2", "--output_dir", str(out),
            "--lora_rank", "4", "--lora_alpha", "8", "--lora_target", "q_proj,v_proj", "--lora_dropout", "0",
            "--val_size", "0.2", "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size",
            "2", "--load_best_model_at_end", "True", "--plot_loss", "True", "--seed", "7", *extra]


def torchrun(tmp_path, argv, nproc=2):
    script, argv_file = tmp_path / "ddp_train.py", tmp_path / f"argv{time.monotonic_ns()}.json"
    script.write_text(SCRIPT)
    argv_file.write_text(json.dumps(argv))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), str(argv_file)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def read_adapter(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def history(out):
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def assert_same_run(got_out, ref_out):
    got, ref = history(got_out), history(ref_out)
    assert [sorted(e) for e in got] == [sorted(e) for e in ref]
    for a, b in zip(got, ref):
        assert a["step"] == b["step"] and a["epoch"] == b["epoch"] and a.get("learning_rate") == b.get("learning_rate")
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    for folder in ("", "checkpoint-2"):
        x, y = read_adapter(Path(got_out) / folder), read_adapter(Path(ref_out) / folder)
        assert sorted(x) == sorted(y)
        for name in y:
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def single(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    t = Trainer(parse_train_args(argv_for(base_dir, out, 4)), progress=False)
    n_train = len(t.train_set)
    t.train()
    return out, n_train


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(single, base_dir, tmp_path):
    ref_out, n_train = single
    # 3 steps x 2 micro-batches of 4 run past the end of epoch 0, whose last global micro-batch has one example:
    # rank 1's share of it is empty, and the loss is still normalized over the tokens of both ranks
    assert n_train % 4 == 1 and n_train < 24, n_train
    out = tmp_path / "ddp"
    t0 = time.perf_counter()
    torchrun(tmp_path, argv_for(base_dir, out, 2))
    print(f"torchrun 2 processes: {time.perf_counter() - t0:.1f} s")
    assert_same_run(out, ref_out)
    assert any("eval_loss" in e for e in history(out))
    # only rank 0 wrote: one log line per entry, the same files as the single run, no temp folders
    lines = (out / "trainer_log.jsonl").read_text().splitlines()
    assert len(lines) == len(history(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref_out.iterdir())


def test_resume_under_torchrun_continues_the_single_process_run(single, base_dir, tmp_path):
    ref_out, _ = single
    out = tmp_path / "resumed"
    shutil.copytree(ref_out / "checkpoint-2", out / "checkpoint-2")  # written by 1 process with batch 4
    torchrun(tmp_path, argv_for(base_dir, out, 2, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert_same_run(out, ref_out)


def test_resume_with_another_global_micro_batch_is_refused(single, base_dir, tmp_path):
    from qwen2_pure.errors import Qwen2PureError
    ref_out, _ = single
    out = tmp_path / "other"
    shutil.copytree(ref_out / "checkpoint-2", out / "checkpoint-2")
    args = parse_train_args(argv_for(base_dir, out, 2, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    with pytest.raises(Qwen2PureError, match="same global micro-batch"):
        Trainer(args, progress=False).train()
