"""`qwen2-pure train` accepts LLaMA-Factory's command line as written, and refuses what it cannot honour."""

import re
import shlex
import warnings
from dataclasses import fields

import pytest

from qwen2_pure import cli
from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.train.args import DESCRIPTION, EPILOG, TrainArgs, build_train_parser, flag_help, parse_train_args

# A LLaMA-Factory web-UI command of June 2024 (Qwen2-7B-Instruct, LoRA on alpaca_zh), as users run it.
LLAMAFACTORY_COMMAND = """
    --stage sft --do_train True --model_name_or_path qwen/Qwen2-7B-Instruct --finetuning_type lora \
    --template qwen --flash_attn auto --dataset_dir data --dataset alpaca_zh --cutoff_len 4096 \
    --learning_rate 5e-05 --num_train_epochs 5.0 --max_samples 100000 --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 4 --lr_scheduler_type cosine --max_grad_norm 1.0 --logging_steps 10 \
    --save_steps 1000 --warmup_steps 0 --optim adamw_torch --packing False --report_to none \
    --output_dir saves/Qwen2-7B-Instruct/lora/train_2024-06-09-23-00 --fp16 True --lora_rank 32 \
    --lora_alpha 16 --lora_dropout 0 --lora_target q_proj,v_proj --val_size 0.1 \
    --evaluation_strategy steps --eval_steps 1000 --per_device_eval_batch_size 2 \
    --load_best_model_at_end True --plot_loss True
"""


def parse(text, **replace):
    argv = shlex.split(text.replace("\\\n", " "))
    for flag, value in replace.items():
        i = argv.index(f"--{flag}")
        if value is None:
            del argv[i:i + 2]
        else:
            argv[i + 1] = value
    return parse_train_args(argv)


def test_a_llamafactory_command_is_accepted_verbatim():
    with pytest.warns(UserWarning, match="fp16"):
        a = parse(LLAMAFACTORY_COMMAND)
    assert (a.stage, a.finetuning_type, a.template, a.dataset) == ("sft", "lora", "qwen", "alpaca_zh")
    assert a.cutoff_len == 4096
    assert a.learning_rate == 5e-5 and a.num_train_epochs == 5.0 and a.max_samples == 100000
    assert a.per_device_train_batch_size == 4 and a.gradient_accumulation_steps == 4
    assert a.lr_scheduler_type == "cosine" and a.max_grad_norm == 1.0 and a.warmup_steps == 0
    assert a.packing is False and a.fp16 is True and a.bf16 is False and a.plot_loss is True
    assert (a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_target) == (32, 16.0, 0.0, "q_proj,v_proj")
    assert a.val_size == 0.1 and a.eval_strategy == "steps" and a.eval_steps == 1000
    assert a.load_best_model_at_end and a.metric_for_best_model == "loss" and a.greater_is_better is False
    assert a.output_dir == "saves/Qwen2-7B-Instruct/lora/train_2024-06-09-23-00"


def test_eval_strategy_new_spelling_and_inference():
    argv = LLAMAFACTORY_COMMAND.replace("--evaluation_strategy", "--eval_strategy")
    argv = argv.replace("--fp16 True", "--bf16 True")
    assert parse(argv).eval_strategy == "steps"
    # without an eval strategy, --load_best_model_at_end with a validation split evaluates on the save schedule
    a = parse(LLAMAFACTORY_COMMAND.replace("--fp16 True", "--bf16 True"), evaluation_strategy=None)
    assert a.eval_strategy == "steps" and any("eval_strategy" in n for n in a.notes)


def test_steps_that_do_not_line_up_are_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Qwen2PureError, match="save_steps.*multiple of.*eval_steps"):
            parse(LLAMAFACTORY_COMMAND, eval_steps="300")
        with pytest.raises(Qwen2PureError, match="save and eval strategy to match"):
            parse(LLAMAFACTORY_COMMAND, evaluation_strategy="no")
        with pytest.raises(Qwen2PureError, match="validation split"):
            parse(LLAMAFACTORY_COMMAND, val_size="0", load_best_model_at_end="False")


@pytest.mark.parametrize("flag,value,match", [
    ("stage", "dpo", "sft"), ("finetuning_type", "full", "lora"), ("optim", "sgd", "AdamW"),
    ("lr_scheduler_type", "polynomial", "cosine"), ("report_to", "wandb", "none"), ("lora_dropout", "1.5", "0, 1"),
    ("cutoff_len", "0", ">= 1"), ("packing", "maybe", "True or False"), ("template", "llama3", "qwen"),
    ("template", "default", "qwen"),
])
def test_bad_values_name_the_flag(flag, value, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Qwen2PureError, match=match) as e:
            parse(LLAMAFACTORY_COMMAND, **{flag: value})
    assert flag in str(e.value) or "True or False" in str(e.value)


def test_fp16_and_bf16_together_and_required_flags():
    with pytest.raises(Qwen2PureError, match="exclude"):
        parse(LLAMAFACTORY_COMMAND + " --bf16 True")
    with pytest.raises(Qwen2PureError, match="--output_dir is required"):
        parse(LLAMAFACTORY_COMMAND.replace("--fp16 True", ""), output_dir=None)
    with pytest.raises(Qwen2PureError, match="unrecognized arguments: --no_such_flag"):
        parse(LLAMAFACTORY_COMMAND + " --no_such_flag 1")


def test_lora_alpha_defaults_to_twice_the_rank():
    a = parse(LLAMAFACTORY_COMMAND.replace("--fp16 True", "--bf16 True"), lora_alpha=None)
    assert a.lora_alpha == 64.0


@pytest.mark.parametrize("flag,value,match", [
    ("eval_dataset", "alpaca_en", "--val_size"), ("metric_for_best_model", "accuracy", "loss"),
    ("greater_is_better", "True", "lowest evaluation loss"),
])
def test_what_the_trainer_does_not_do_is_refused(flag, value, match):
    with pytest.raises(Qwen2PureError, match=match) as e:
        parse(LLAMAFACTORY_COMMAND.replace("--fp16 True", "--bf16 True") + f" --{flag} {value}")
    assert f"--{flag}" in str(e.value)


# wording for developers that must not reach a user: this project's history, issue numbers, bracket tags
INTERNAL = re.compile(r"\bseed's\b|\bthe seed\b|\bworkflow\b|\bissues?\b|\[[A-Z][A-Z0-9]{0,3}\]|§", re.IGNORECASE)


def test_every_flag_has_a_one_line_help():
    flags = [f for f in fields(TrainArgs) if f.name != "notes"]
    for f in flags:
        text = flag_help(f)
        assert text.strip() and "\n" not in text and len(text) < 200, f.name
        assert re.search(r"default|\(required\)|\(refused\)", text), f"--{f.name} does not state its default"
        assert not INTERNAL.search(text), (f.name, text)
    for text in (DESCRIPTION, EPILOG):
        assert not INTERNAL.search(text), text


def test_train_help_lists_every_flag(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for f in fields(TrainArgs):
        if f.name != "notes":
            assert f"--{f.name}" in out
    assert "--evaluation_strategy" in out and "example:" in out
    assert not INTERNAL.search(out)
    helps = {a.dest: a.help for a in build_train_parser()._actions if a.dest != "help"}
    assert all(helps.values()) and set(helps) == {f.name for f in fields(TrainArgs)} - {"notes"}
