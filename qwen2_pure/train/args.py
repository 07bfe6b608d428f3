"""`qwen2-pure train` arguments: LLaMA-Factory's command line, accepted as it is written.

A `llamafactory-cli train --stage sft --finetuning_type lora ...` command runs unchanged with `qwen2-pure train`
in front: every flag it uses has the same spelling and meaning here (HF `TrainingArguments` style: `--flag
value`, booleans as True/False). What is not implemented is refused with a message naming the flag, never
silently ignored; the one exception, `--flash_attn`, only picks an attention kernel and says so in its help.

Each field carries its `--help` line in `metadata["help"]`; `(default: ...)` is added from the field's default
unless the text already states it.

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
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

from ..errors import Qwen2PureError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")

DESCRIPTION = """\
LoRA supervised fine-tuning of a Qwen2 model, with LLaMA-Factory's command line: a
`llamafactory-cli train --stage sft --finetuning_type lora ...` command runs unchanged with
`qwen2-pure train` in front. Flags take a value (--flag VALUE; booleans as True or False).
Flags or values that qwen2-pure does not implement are refused with a message naming them."""

EPILOG = """\
example:
  qwen2-pure train --stage sft --do_train True --model_name_or_path qwen/Qwen2-7B-Instruct \\
    --finetuning_type lora --template qwen --dataset_dir data --dataset alpaca_zh \\
    --lora_target q_proj,v_proj --bf16 True --output_dir saves/qwen2-7b-lora"""


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y"):
        return True
    if low in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _flag(default, help: str, metavar: Optional[str] = None):
    """A TrainArgs field with its `--help` line (and, optionally, the metavar shown in the usage)."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass
class TrainArgs:
    # model and method
    model_name_or_path: Optional[str] = _flag(
        None, "base model: a checkpoint folder, a .gguf file or a ModelScope id such as qwen/Qwen2-7B-Instruct "
        "(default: the small demo model bundled with qwen2-pure)", "MODEL")
    stage: str = _flag("sft", "training stage; only sft (supervised fine-tuning) is implemented", "STAGE")
    do_train: bool = _flag(True, "run training; must be True (LLaMA-Factory evaluates or predicts without it)")
    finetuning_type: str = _flag("lora", "what to train; only lora (LoRA adapters on the frozen model) is "
                                 "implemented", "TYPE")
    template: str = _flag("qwen", "prompt format of the samples; only qwen, LLaMA-Factory's ChatML template "
                          "for Qwen (qwen2 is accepted as another name for it)", "NAME")
    flash_attn: str = _flag("auto", "LLaMA-Factory's attention backend (auto, disabled, sdpa or fa2); accepted "
                            "but has no effect: qwen2-pure picks its own attention kernel", "MODE")
    # data
    dataset_dir: str = _flag("data", "folder holding dataset_info.json, which maps dataset names to data files",
                             "DIR")
    dataset: Optional[str] = _flag(None, "dataset names from dataset_info.json to train on, comma-separated "
                                   "(required)", "NAMES")
    eval_dataset: Optional[str] = _flag(None, "LLaMA-Factory's separate evaluation datasets; not implemented "
                                        "(refused): hold out part of --dataset with --val_size", "NAMES")
    cutoff_len: int = _flag(2048, "maximum tokens per encoded sample; longer conversations are cut turn by turn, "
                            "as LLaMA-Factory does")
    max_samples: Optional[int] = _flag(None, "read at most N samples of each dataset (default: all)")
    val_size: float = _flag(0.0, "samples held out for evaluation: a fraction in [0, 1) or a whole number "
                            "(default: 0, none)", "SIZE")
    packing: bool = _flag(False, "pack several samples into each cutoff_len-token sequence; like LLaMA-Factory's "
                          "packing, they can attend to one another")
    default_system: Optional[str] = _flag(None, "system prompt for samples that have none (default: the "
                                          "template's own)", "TEXT")
    # LoRA
    lora_rank: int = _flag(8, "rank r of the LoRA matrices")
    lora_alpha: Optional[float] = _flag(None, "LoRA scale numerator: updates are scaled by alpha / r (default: "
                                        "2 x --lora_rank, as in LLaMA-Factory)", "ALPHA")
    lora_dropout: float = _flag(0.0, "dropout on the input of the LoRA matrices, in [0, 1)", "P")
    lora_target: str = _flag("all", "layers to adapt: all (every linear layer of the decoder, not lm_head) or "
                             "names such as q_proj,v_proj", "MODULES")
    use_rslora: bool = _flag(False, "rank-stabilized LoRA: scale updates by alpha / sqrt(r) instead of alpha / r")
    # optimization
    learning_rate: float = _flag(5e-5, "peak learning rate of AdamW", "LR")
    num_train_epochs: float = _flag(3.0, "passes over the training data, fractions allowed; --max_steps > 0 "
                                    "overrides it", "EPOCHS")
    max_steps: int = _flag(-1, "total optimizer steps; when > 0 it overrides --num_train_epochs (default: -1, "
                           "unset)")
    per_device_train_batch_size: int = _flag(8, "samples per training micro-batch in each process")
    per_device_eval_batch_size: int = _flag(8, "samples per evaluation batch in each process")
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step; the loss is averaged over "
                                             "all their target tokens")
    lr_scheduler_type: str = _flag("linear", "learning-rate schedule after warmup: " + ", ".join(SCHEDULERS),
                                   "SCHEDULE")
    warmup_steps: int = _flag(0, "optimizer steps of linear warmup from 0; when > 0 it overrides --warmup_ratio")
    warmup_ratio: float = _flag(0.0, "warmup as a fraction of the total steps, used when --warmup_steps is 0",
                                "RATIO")
    weight_decay: float = _flag(0.0, "AdamW weight decay")
    adam_beta1: float = _flag(0.9, "AdamW beta1, the decay of the gradient average", "BETA")
    adam_beta2: float = _flag(0.999, "AdamW beta2, the decay of the squared-gradient average", "BETA")
    adam_epsilon: float = _flag(1e-8, "AdamW epsilon, added to the denominator", "EPS")
    max_grad_norm: float = _flag(1.0, "clip the norm of all LoRA gradients together to this value", "NORM")
    optim: str = _flag("adamw_torch", "optimizer: adamw_torch (adamw_torch_fused and adamw_hf are accepted and "
                       "run the same AdamW)", "NAME")
    gradient_checkpointing: bool = _flag(False, "recompute activations in the backward pass: less memory, more "
                                         "time")
    fp16: bool = _flag(False, "model in float16, float16 autocast and a gradient scaler (default: False, float32)"
                       "; Qwen2 often gets NaN or zero losses in fp16, prefer --bf16")
    bf16: bool = _flag(False, "model in bfloat16 and bfloat16 autocast, the LoRA weights in float32; excludes "
                       "--fp16 (default: False, float32)")
    seed: int = _flag(42, "random seed of the LoRA initialization, the data order, the validation split and "
                      "dropout")
    # logging, evaluation, checkpoints
    output_dir: Optional[str] = _flag(None, "folder for the checkpoints, the final adapter, the log and the plots "
                                      "(required)", "DIR")
    overwrite_output_dir: bool = _flag(False, "allow an --output_dir that already has files in it")
    logging_steps: float = _flag(500, "log the training loss every N optimizer steps", "N")
    eval_strategy: Optional[str] = _flag(None, "when to evaluate on the --val_size split: no, steps or epoch "
                                         "(default: no, or the save strategy with --load_best_model_at_end)", "WHEN")
    eval_steps: Optional[float] = _flag(None, "evaluate every N optimizer steps with --eval_strategy steps "
                                        "(default: --logging_steps)", "N")
    save_strategy: str = _flag("steps", "when to write a checkpoint: no, steps or epoch", "WHEN")
    save_steps: float = _flag(500, "write a checkpoint every N optimizer steps with --save_strategy steps", "N")
    save_total_limit: Optional[int] = _flag(None, "keep at most N checkpoints, the best one always among them "
                                            "(default: all)")
    load_best_model_at_end: bool = _flag(False, "end with the adapter of the checkpoint that had the lowest "
                                         "evaluation loss, not the last one")
    metric_for_best_model: Optional[str] = _flag(None, "metric that picks the best checkpoint; only loss (or "
                                                 "eval_loss) is implemented (default: loss)", "METRIC")
    greater_is_better: Optional[bool] = _flag(None, "whether a larger metric is better; False, as the metric is "
                                              "a loss (default: False)")
    resume_from_checkpoint: Optional[str] = _flag(None, "continue from a checkpoint-N folder that an earlier run "
                                                  "with the same batch settings wrote (default: start afresh)", "DIR")
    plot_loss: bool = _flag(False, "write training_loss.png and training_eval_loss.png to --output_dir (needs "
                            "matplotlib)")
    report_to: str = _flag("none", "experiment tracker; only none (the log goes to trainer_log.jsonl in "
                           "--output_dir)", "TRACKER")
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
        if self.template.lower() not in ("qwen", "qwen2"):
            bad("template", "only qwen, LLaMA-Factory's template for Qwen, is implemented")
        if self.flash_attn not in ("auto", "disabled", "sdpa", "fa2"):
            bad("flash_attn", "expected auto, disabled, sdpa or fa2")
        if self.optim not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
            bad("optim", "only AdamW (adamw_torch) is implemented")
        if self.report_to not in ("none", "None", ""):
            bad("report_to", "experiment trackers are not integrated; use none (logs go to trainer_log.jsonl)")
        if self.eval_dataset:  # the trainer evaluates on the split that --val_size holds out, nothing else
            bad("eval_dataset", "a separate evaluation dataset is not implemented; hold out part of --dataset "
                "with --val_size")
        if self.metric_for_best_model not in (None, "loss", "eval_loss"):
            bad("metric_for_best_model", "only the evaluation loss (loss) is implemented")
        if self.greater_is_better:
            bad("greater_is_better", "the best checkpoint is the one with the lowest evaluation loss")
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
            if self.load_best_model_at_end and self.val_size > 0:
                self.eval_strategy = self.save_strategy
                self.notes.append(f"eval_strategy set to {self.save_strategy!r} to match the save strategy "
                                  "(--load_best_model_at_end)")
            else:
                self.eval_strategy = "no"
        if self.eval_strategy != "no" and not self.val_size > 0:
            bad("eval_strategy", "evaluation needs a validation split (--val_size)")
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
        self.greater_is_better = False  # the metric is a loss
        return self


def flag_help(f) -> str:
    """The `--help` line of TrainArgs field `f`: its text, and its default unless the text states one."""
    text = f.metadata["help"]
    if "default" in text or "(required)" in text or f.default is MISSING or f.default is None:
        return text
    return f"{text} (default: {f.default:g})" if isinstance(f.default, float) else f"{text} (default: {f.default})"


def build_train_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Add every TrainArgs field as `--name VALUE` (plus `--evaluation_strategy`) to `parser`."""
    parser = parser or argparse.ArgumentParser(prog="qwen2-pure train", description=DESCRIPTION, epilog=EPILOG,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainArgs):
        if "help" not in f.metadata:  # notes: filled in by validate, not a flag
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in kind:
            conv, metavar = _bool, "True|False"
        elif "int" in kind:
            conv, metavar = int, "N"
        elif "float" in kind:
            conv, metavar = float, "X"
        else:
            conv, metavar = str, "TEXT"
        names = [f"--{f.name}"] + (["--evaluation_strategy"] if f.name == "eval_strategy" else [])
        parser.add_argument(*names, dest=f.name, type=conv, default=None, metavar=f.metadata["metavar"] or metavar,
                            help=flag_help(f))
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
