"""`qwen2-pure train` arguments: LLaMA-Factory's command line, accepted as it is written.

The seed's workflow is a `llamafactory-cli train --stage sft --finetuning_type lora ...` command; every
flag of it is accepted here with the same spelling and meaning (HF `TrainingArguments` style: `--flag
value`, booleans as True/False), so the same line runs with `qwen2-pure train` in front. What we do
not implement is refused with a message naming the flag, never silently ignored.

Consistency rules follow transformers' `TrainingArguments.__post_init__`:
- `--evaluation_strategy` is the older spelling of `--eval_strategy`;
- `--load_best_model_at_end` needs evaluation and saving on the same schedule: when no eval strategy is
  given but there is a validation split, evaluation follows the save strategy; `save_steps` must be a
  multiple of `eval_steps`;
- `--fp16` and `--bf16` exclude each other; fp16 is accepted with a warning (Qwen2 + fp16 is the most
  reported cause of NaN or zero losses; bf16 is what Qwen recommends).
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

from ..errors import Qwen2PureError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y"):
        return True
    if low in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


@dataclass
class TrainArgs:
    # model and method
    model_name_or_path: Optional[str] = None
    stage: str = "sft"
    do_train: bool = True
    finetuning_type: str = "lora"
    template: str = "qwen"
    flash_attn: str = "auto"
    # data
    dataset_dir: str = "data"
    dataset: Optional[str] = None
    eval_dataset: Optional[str] = None
    cutoff_len: int = 2048
    max_samples: Optional[int] = None
    val_size: float = 0.0
    packing: bool = False
    default_system: Optional[str] = None
    # LoRA
    lora_rank: int = 8
    lora_alpha: Optional[float] = None  # LLaMA-Factory: defaults to 2 * lora_rank
    lora_dropout: float = 0.0
    lora_target: str = "all"
    use_rslora: bool = False
    # optimization
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    fp16: bool = False
    bf16: bool = False
    seed: int = 42
    # logging, evaluation, checkpoints
    output_dir: Optional[str] = None
    overwrite_output_dir: bool = False
    logging_steps: float = 500
    eval_strategy: Optional[str] = None
    eval_steps: Optional[float] = None
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    resume_from_checkpoint: Optional[str] = None
    plot_loss: bool = False
    report_to: str = "none"
    notes: list = field(default_factory=list)  # what was inferred, for the run log

    def validate(self) -> "TrainArgs":
        def bad(flag, why):
            raise Qwen2PureError(f"--{flag} {getattr(self, flag)!r}: {why}")

        if self.stage != "sft":
            bad("stage", "only supervised fine-tuning (sft) is implemented")
        if self.finetuning_type != "lora":
            bad("finetuning_type", "only lora is implemented")
        if not self.do_train:
            bad("do_train", "qwen2-pure train trains; pass --do_train True")
        if self.template.lower() not in ("qwen", "qwen2", "default"):
            bad("template", "only the qwen template is implemented (the model's own chat template)")
        if self.flash_attn not in ("auto", "disabled", "sdpa", "fa2"):
            bad("flash_attn", "expected auto, disabled, sdpa or fa2")
        if self.optim not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
            bad("optim", "only AdamW (adamw_torch) is implemented")
        if self.report_to not in ("none", "None", ""):
            bad("report_to", "experiment trackers are not integrated; use none (logs go to trainer_log.jsonl)")
        for flag in ("dataset", "output_dir"):  # no --model_name_or_path: the embedded demo model
            if not getattr(self, flag):
                raise Qwen2PureError(f"--{flag} is required")
        if self.lr_scheduler_type not in SCHEDULERS:
            bad("lr_scheduler_type", f"expected one of {', '.join(SCHEDULERS)}")
        for flag in ("cutoff_len", "lora_rank", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps"):
            if getattr(self, flag) < 1:
                bad(flag, "must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be > 0")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            bad("val_size", "a fraction in [0, 1) or a whole number of samples")
        if self.fp16 and self.bf16:
            raise Qwen2PureError("--fp16 and --bf16 exclude each other")
        if self.fp16:
            warnings.warn("--fp16 with Qwen2 often gives NaN or zero losses (LLaMA-Factory #4278, QwenLM #670); "
                          "prefer --bf16 True where supported. Running with fp16 autocast and a grad scaler, "
                          "LoRA weights in fp32.", stacklevel=2)
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        for flag in ("save_strategy", "eval_strategy"):
            value = getattr(self, flag)
            if value is not None and value not in STRATEGIES:
                bad(flag, f"expected one of {', '.join(STRATEGIES)}")
        if self.eval_strategy is None:
            if self.load_best_model_at_end and (self.val_size > 0 or self.eval_dataset):
                self.eval_strategy = self.save_strategy
                self.notes.append(f"eval_strategy set to {self.save_strategy!r} to match the save strategy "
                                  "(--load_best_model_at_end)")
            else:
                self.eval_strategy = "no"
        if self.eval_strategy != "no" and not (self.val_size > 0 or self.eval_dataset):
            bad("eval_strategy", "evaluation needs a validation split (--val_size) or --eval_dataset")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps  # transformers' rule
        if self.load_best_model_at_end:
            if self.eval_strategy != self.save_strategy:
                raise Qwen2PureError(
                    f"--load_best_model_at_end requires the save and eval strategy to match, but found "
                    f"--eval_strategy {self.eval_strategy} and --save_strategy {self.save_strategy}")
            if self.eval_strategy == "steps" and self.save_steps % self.eval_steps != 0:
                raise Qwen2PureError(
                    f"--load_best_model_at_end requires --save_steps ({self.save_steps:g}) to be a multiple of "
                    f"--eval_steps ({self.eval_steps:g})")
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if self.greater_is_better is None:
            self.greater_is_better = bool(self.metric_for_best_model) and \
                not self.metric_for_best_model.endswith("loss")
        return self


def build_train_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Add every TrainArgs field as `--name VALUE` (plus `--evaluation_strategy`) to `parser`."""
    parser = parser or argparse.ArgumentParser(prog="qwen2-pure train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainArgs):
        if f.name == "notes":
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in kind:
            conv = _bool
        elif "int" in kind:
            conv = int
        elif "float" in kind:
            conv = float
        else:
            conv = str
        names = [f"--{f.name}"] + (["--evaluation_strategy"] if f.name == "eval_strategy" else [])
        parser.add_argument(*names, dest=f.name, type=conv, default=None, metavar=f.name.upper())
    return parser


def parse_train_args(argv: list[str]) -> TrainArgs:
    """TrainArgs from a LLaMA-Factory-style command line, validated (errors name the flag)."""
    parser = build_train_parser()

    def fail(message):
        raise Qwen2PureError(f"train: {message}")

    parser.error = fail  # one clear line instead of argparse's usage dump and exit
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    return TrainArgs(**given).validate()
