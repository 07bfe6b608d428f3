"""The LoRA SFT loop on a tiny checkpoint with the real Qwen2.5 tokenizer and the project's demo dataset."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from qwen2_pure.train.args import parse_train_args
from qwen2_pure.train.trainer import Trainer, lr_lambda, smooth, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_dir(demo_tokenizer_dir, tmp_path_factory):
    from hf_utils import make_hf_checkpoint
    d = tmp_path_factory.mktemp("train_base")
    make_hf_checkpoint(d, heads=2, kv_heads=1, head_dim=16, layers=2, tied=True, intermediate=64, vocab=151936,
                       seed=0, max_pos=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_tokenizer_dir / name, d / name)
    return d


def args_for(base_dir, out, *extra):
    argv = ["--stage", "sft", "--do_train", "True", "--model_name_or_path", str(base_dir), "--finetuning_type", "lora",
            "--template", "qwen", "--dataset_dir", str(ROOT / "data"), "--dataset", "qwen2_pure_demo",
            "--cutoff_len", "128", "--learning_rate", "2e-2", "--num_train_epochs", "2", "--max_samples", "40",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--lr_scheduler_type",
            "cosine", "--logging_steps", "2", "--save_steps", "4", "--output_dir", str(out), "--lora_rank", "8",
            "--lora_alpha", "16", "--lora_target", "all", "--val_size", "0.2", "--eval_strategy", "steps",
            "--eval_steps", "4", "--per_device_eval_batch_size", "4", "--plot_loss", "True", "--seed", "7", *extra]
    return parse_train_args(argv)


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    t = Trainer(args_for(base_dir, out, "--load_best_model_at_end", "True"), progress=False)
    initial = t.evaluate()  # LoRA B starts at zero: this is the base model's eval loss
    state = t.train()
    state["initial_eval_loss"] = initial
    return out, state


def test_a_short_run_lowers_the_eval_loss_and_writes_its_files(run):
    out, state = run
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(evals) == 2, evals  # at steps 4 and 8 (the last step has its eval already)
    assert min(evals) < state["initial_eval_loss"] - 0.1, (state["initial_eval_loss"], evals)
    assert losses[-1] < losses[0]
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "trainer_log.jsonl",
                 "training_loss.png", "training_eval_loss.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    best_step = 4 if evals[0] < evals[1] else 8  # evaluations happen at the save steps 4 and 8
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert state["best_metric"] == min(evals[:2])
    lines = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert all({"current_steps", "total_steps", "epoch"} <= set(x) for x in lines)
    assert any("tokens_per_second" in x and "grad_norm" in x and "learning_rate" in x for x in lines)
    assert not list(out.glob(".checkpoint-*"))  # no temp folders left


def test_outputs_have_an_ordinary_files_mode(run):
    """checkpoint-N/ folders and the adapter files in them and in output_dir: 0777/0666 less the umask, like
    trainer_state.json and the plots (not a temp folder's 0700 or a temp file's 0600)."""
    out, _ = run
    umask = os.umask(0)
    os.umask(umask)
    for d in out.glob("checkpoint-*"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask, d.name
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "adapter_config.json", "training_state.pt"}
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.relative_to(out)

def test_the_adapter_loads_in_peft_with_equal_logits(run, base_dir):
    peft = pytest.importorskip("peft")
    import transformers

    import qwen2_pure as q
    from qwen2_pure.lora import load_adapter
    out, _ = run
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                           attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    ours = load_adapter(q.load_model(base_dir), out)
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x).logits, rtol=0, atol=1e-5)
        base = q.load_model(base_dir)(x)
    assert (ours(x) - base).abs().max() > 1e-3  # the trained adapter changes the model


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(run, base_dir, tmp_path):
    out, state = run
    ref = [e for e in state["log_history"] if "loss" in e]
    resumed_out = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-4", resumed_out / "checkpoint-4")
    args = args_for(base_dir, resumed_out, "--load_best_model_at_end", "True", "--resume_from_checkpoint",
                    str(resumed_out / "checkpoint-4"))
    state2 = train(args, progress=False)
    got = [e for e in state2["log_history"] if "loss" in e]
    assert [e["step"] for e in got] == [e["step"] for e in ref]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)


def test_output_dir_must_be_empty_or_resumed(run, base_dir):
    out, _ = run
    with pytest.raises(Exception, match="not empty"):
        Trainer(args_for(base_dir, out))


def test_schedules_and_smoothing():
    cos = lr_lambda("cosine", 2, 10)
    assert [cos(0), cos(1), cos(2)] == [0.0, 0.5, 1.0] and cos(10) == pytest.approx(0.0, abs=1e-12)
    assert cos(6) == pytest.approx(0.5)
    lin = lr_lambda("linear", 0, 4)
    assert [lin(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda("constant", 0, 4)(3) == 1.0 and lr_lambda("constant_with_warmup", 4, 8)(2) == 0.5
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected


def test_gradient_checkpointing_gives_the_same_gradients(base_dir, tmp_path):
    from qwen2_pure.train.trainer import enable_gradient_checkpointing, token_loss_sum
    grads = []
    for ckpt in (False, True):
        t = Trainer(args_for(base_dir, tmp_path / f"gc{ckpt}", "--lora_dropout", "0"), progress=False)
        if ckpt:
            enable_gradient_checkpointing(t.model)
        batch = t.collate(t.train_set[:4])
        loss, n = token_loss_sum(t.model, batch)
        (loss / n).backward()
        grads.append([p.grad.clone() for p in t.params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_nan_loss_stops_with_a_clear_message(base_dir, tmp_path, monkeypatch):
    import qwen2_pure.train.trainer as tr
    from qwen2_pure.errors import Qwen2PureError
    real, calls = tr.token_loss_sum, []

    def poisoned(model, batch):
        loss, n = real(model, batch)
        if model.training:  # evaluation batches do not count
            calls.append(1)
        return (loss * float("nan") if len(calls) > 8 else loss), n  # steps 1-4 fine (2 micro-batches each)

    monkeypatch.setattr(tr, "token_loss_sum", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(Qwen2PureError, match=r"loss became nan at step 5.*checkpoint-4"):
        train(args_for(base_dir, out), progress=False)
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()


def cli_argv(base_dir, out, targets="q_proj,v_proj"):
    return ["train", "--stage", "sft", "--do_train", "True", "--model_name_or_path", str(base_dir),
            "--finetuning_type", "lora", "--template", "qwen", "--dataset_dir", str(ROOT / "data"), "--dataset",
            "qwen2_pure_demo", "--cutoff_len", "64", "--max_samples", "8", "--per_device_train_batch_size", "4",
            "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2", "--output_dir", str(out),
            "--lora_target", targets, "--report_to", "none", "--plot_loss", "True"]


def test_cli_train_runs_the_llamafactory_command_line(base_dir, tmp_path, capsys):
    from qwen2_pure.cli import main
    out = tmp_path / "cli"
    argv = cli_argv(base_dir, out)
    assert main(argv) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    assert "2 steps" in capsys.readouterr().err
    assert main(["train", "--stage", "dpo"] + argv[3:]) == 2  # one clear line, exit 2
    assert "--stage 'dpo'" in capsys.readouterr().err


def test_fp16_a_skipped_step_does_not_advance_the_schedule(base_dir, tmp_path, monkeypatch):
    """The grad scaler skips the update of a step with inf gradients; the learning-rate schedule must not
    move either (transformers' Trainer steps the scheduler only when the optimizer step ran)."""
    import qwen2_pure.train.trainer as tr
    from qwen2_pure.lora import lora_state_dict

    class InfGrad(torch.autograd.Function):  # a finite loss whose gradients overflow, as fp16 ones do
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    real, calls, snapshots = tr.token_loss_sum, [], []

    def overflowing(model, batch):
        loss, n = real(model, batch)
        if model.training:
            calls.append(1)
            if len(calls) % 2 == 1:  # the first micro-batch of each step (2 per step): the weights before it
                snapshots.append({k: v.clone() for k, v in lora_state_dict(model).items()})
            if len(calls) == 3:  # step 2
                loss = InfGrad.apply(loss)
        return loss, n

    monkeypatch.setattr(tr, "token_loss_sum", overflowing)
    args = args_for(base_dir, tmp_path / "fp16", "--fp16", "True", "--max_steps", "3", "--learning_rate", "1e-3",
                    "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "100", "--plot_loss", "False")
    t = Trainer(args, progress=False)
    state = t.train()
    logs = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    assert math.isfinite(logs[0]["grad_norm"]) and not math.isfinite(logs[1]["grad_norm"])
    # cosine over 3 steps, no warmup: 1e-3, 7.5e-4, 2.5e-4; the skipped step 2 leaves step 3 at 7.5e-4
    assert [e["learning_rate"] for e in logs] == pytest.approx([1e-3, 7.5e-4, 7.5e-4], rel=1e-12)
    assert all(torch.equal(snapshots[2][k], v) for k, v in snapshots[1].items())  # step 2 changed nothing
    assert not all(torch.equal(snapshots[1][k], v) for k, v in snapshots[0].items())  # step 1 did
    assert t.scaler.get_scale() == 2.0 ** 15  # halved once, from 2**16


def test_cli_train_on_a_tied_head_then_merge_and_export_keep_the_logits(base_dir, tmp_path):
    """--lora_target q_proj,lm_head on a tie_word_embeddings model: the merged and the exported models give
    the unmerged adapter's logits (merging unties the head instead of changing the embedding)."""
    import qwen2_pure as q
    from qwen2_pure.cli import main
    from qwen2_pure.lora import merge_lora
    out = tmp_path / "head"
    assert main(cli_argv(base_dir, out, "q_proj,lm_head") + ["--learning_rate", "1e-2", "--plot_loss", "False"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["lm_head", "q_proj"]
    x = torch.randint(0, 1000, (1, 12))
    base = q.load_model(base_dir)
    model = q.load_model(base_dir, adapter=out)
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - base(x)).abs().max() > 1e-3  # the adapter changes the model
        merged = merge_lora(model)(x)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)
    assert main(["export", "--model", str(base_dir), "--adapter", str(out), "--output", str(tmp_path / "m")]) == 0
    exported = q.load_model(tmp_path / "m")
    assert not exported.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(exported(x), unmerged, rtol=0, atol=1e-4)
