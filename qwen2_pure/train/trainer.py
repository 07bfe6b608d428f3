"""The LoRA SFT loop: what `llamafactory-cli train --stage sft --finetuning_type lora` does, in one file.

    args = parse_train_args([...])      # the LLaMA-Factory command line (train/args.py)
    train(args)                         # writes output_dir/ as LLaMA-Factory + transformers' Trainer do

Steps: load the base model (frozen) and wrap the target linears with LoRA (fp32 LoRA weights whatever
the base dtype); build the SFT examples (train/data.py); AdamW over the LoRA parameters with a
warmup + cosine/linear/constant schedule; micro-batches of `per_device_train_batch_size`, gradients
accumulated over `gradient_accumulation_steps` with the loss normalized over all target tokens of the
accumulated micro-batches (so a long example weighs what its tokens weigh, as transformers >= 4.46 does);
gradient clipping; a log line every `logging_steps`, an eval every `eval_steps`, a checkpoint every
`save_steps`; at the end the adapter (or the best one, with `load_best_model_at_end`) in output_dir,
trainer_state.json, trainer_log.jsonl and the loss plots.

Checkpoints hold what an exact resume needs: the adapter, optimizer, scheduler and RNG states and the
position in the data order (the order of epoch e is a permutation drawn from `seed + e`, so it can be
regenerated). Every checkpoint folder is written beside its final name and renamed into place
(`qwen2_pure.safetensors_io.write_folder`, the writer of every folder the package makes).

Several processes (`torchrun --nproc_per_node W ...`, WORLD_SIZE > 1): data parallel through
torch.distributed (gloo on CPU, nccl on CUDA, each rank on cuda:LOCAL_RANK), same seed on every rank.
A run on W processes with `per_device_train_batch_size` b is the run of one process with b*W: the global
micro-batches are the single process's (the epoch permutation from seed + epoch, cut into b*W slices),
rank r takes the r-th b of each; the loss is normalized over the target tokens of all ranks and all
accumulated micro-batches (their count all-reduced before the backward passes) and the LoRA gradients are
all-reduced (summed) after them, so the update, the clipping and the logged loss equal the single
process's. Evaluation batches are shared round-robin between the ranks and their sums all-reduced. Only
rank 0 writes files; the others wait at a barrier. Checkpoints are read by every rank on resume (a
filesystem all ranks see, as with transformers' Trainer).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import Qwen2PureError
from ..safetensors_io import SafetensorsFile, write_folder
from .args import TrainArgs

TRAINER_STATE = "trainer_state.json"
TRAINER_LOG = "trainer_log.jsonl"
RESUME_STATE = "training_state.pt"  # optimizer, scheduler, RNG, data position


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at optimizer step s, as transformers' schedulers define it."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant_with_warmup" or kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine, one half-wave
    return f


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens (labels != -100) and their count."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels != -100).sum())


class Dist:
    """This process's place in a torchrun launch (world 1 when not launched by torchrun)."""

    def __init__(self):
        import torch.distributed as dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        self.device = None  # None: load_model's default (CPU), as a single process does
        if self.world > 1:
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo")
                self.owns_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum over the ranks of a few numbers (float64, so token counts stay exact)."""
        if not self.enabled:
            return values
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.owns_group = False


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        plain = layer.forward
        layer.forward = lambda *a, _f=plain: checkpoint(_f, *a, use_reentrant=False)


@torch.no_grad()
def load_lora_weights(model, directory) -> None:
    """Copy a saved adapter's tensors into the model's existing LoRA layers (resume, best checkpoint)."""
    from ..lora import lora_state_dict
    target = lora_state_dict(model)  # detached views: copying into them writes the parameters
    path = Path(directory) / "adapter_model.safetensors"
    with SafetensorsFile(path) as f:
        missing = sorted(set(target) - set(f.names()))
        if missing:
            raise Qwen2PureError(f"{path}: missing LoRA tensors {missing[:3]} (trained with other targets?)")
        for name, t in target.items():
            if f.shape(name) != tuple(t.shape):
                raise Qwen2PureError(f"{path}: '{name}' has shape {list(f.shape(name))}, expected {list(t.shape)}")
            t.copy_(f.get(name))


class Trainer:
    def __init__(self, args: TrainArgs, progress: bool = True):
        from ..loading import load_model, load_tokenizer, resolve_source
        from ..lora import apply_lora
        from .data import SFTCollator, build_sft_data, resolve_pad_token_id

        self.args, self.progress = args, progress
        self.dist = Dist()
        self.out = Path(args.output_dir)
        if self.out.exists() and any(self.out.iterdir()) and not (args.overwrite_output_dir
                                                                   or args.resume_from_checkpoint):
            raise Qwen2PureError(f"--output_dir {self.out} exists and is not empty; pass --overwrite_output_dir "
                                 "True or --resume_from_checkpoint")
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        self.base = str(resolve_source(args.model_name_or_path))  # None: the demo checkpoint's folder
        self.tokenizer = load_tokenizer(self.base)
        self.model = load_model(self.base, dtype=self.dtype, device=self.dist.device)
        apply_lora(self.model, args.lora_target, r=args.lora_rank, alpha=args.lora_alpha,
                   dropout=args.lora_dropout, use_rslora=args.use_rslora)
        if self.dist.enabled:  # every rank starts from rank 0's LoRA weights, as DDP does
            import torch.distributed as dist
            for p in self.model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, 0)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        data = build_sft_data(self.tokenizer, args.dataset, args.dataset_dir, cutoff_len=args.cutoff_len,
                              max_samples=args.max_samples, val_size=args.val_size, seed=args.seed,
                              packing=args.packing, default_system=args.default_system)
        if not data.train:
            raise Qwen2PureError(f"--dataset {args.dataset}: no training examples left after the validation split")
        self.train_set, self.eval_set = data.train, data.eval
        self.collate = SFTCollator(resolve_pad_token_id(self.tokenizer))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon, weight_decay=args.weight_decay)
        micro = args.per_device_train_batch_size * self.dist.world  # the global micro-batch
        self.batches_per_epoch = math.ceil(len(self.train_set) / micro)
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps))
        self.total_steps = args.max_steps if args.max_steps > 0 else \
            math.ceil(args.num_train_epochs * self.steps_per_epoch)
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(args.lr_scheduler_type, warmup, self.total_steps))
        self.scaler = torch.amp.GradScaler("cpu" if self.model.device.type == "cpu" else "cuda",
                                           enabled=args.fp16)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.log_history: list[dict] = []
        self.best: Optional[tuple[float, str]] = None  # (eval loss, checkpoint folder)

    # ---- data order ----------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        return torch.randperm(len(self.train_set), generator=g).tolist()

    def micro_batches(self):
        """(index in epoch, batch) from the current position on, forever (the loop stops it). Under W ranks
        the batch is this rank's share of the global micro-batch (None when the last one leaves it none)."""
        per_rank = self.args.per_device_train_batch_size
        micro = per_rank * self.dist.world
        while True:
            order = self.epoch_order(self.epoch)
            for b in range(self.batch_in_epoch, self.batches_per_epoch):
                idx = order[b * micro:(b + 1) * micro]
                if self.dist.enabled:
                    idx = idx[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
                yield b, (self._to_device(self.collate([self.train_set[i] for i in idx])) if idx else None)
            self.epoch += 1
            self.batch_in_epoch = 0

    def _to_device(self, batch: dict) -> dict:
        if self.dist.device is None:
            return batch
        return {k: v.to(self.dist.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the eval set; under W ranks its batches are dealt round-robin (the same
        batches as one process's), and every rank must call it."""
        self.model.eval()
        total, count = 0.0, 0
        size = self.args.per_device_eval_batch_size
        for k, i in enumerate(range(0, len(self.eval_set), size)):
            if k % self.dist.world != self.dist.rank:
                continue
            loss, n = token_loss_sum(self.model, self._to_device(self.collate(self.eval_set[i:i + size])))
            total, count = total + float(loss), count + n
        self.model.train()
        total, count = self.dist.sum([total, float(count)])
        return total / max(count, 1)

    # ---- saving --------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"global_step": self.step, "max_steps": self.total_steps, "epoch": self.epoch_float(),
                "num_train_epochs": self.args.num_train_epochs, "logging_steps": self.args.logging_steps,
                "eval_steps": self.args.eval_steps, "save_steps": self.args.save_steps,
                "train_batch_size": self.args.per_device_train_batch_size, "log_history": self.log_history,
                "best_metric": self.best[0] if self.best else None,
                "best_model_checkpoint": self.best[1] if self.best else None}

    def epoch_float(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    def save_checkpoint(self) -> Path:
        final = self.out / f"checkpoint-{self.step}"
        if self.dist.main:
            self._write_checkpoint(final)
        self.dist.barrier()  # nobody reads or lists checkpoints before rank 0 has written this one
        return final

    def _write_checkpoint(self, final: Path) -> None:
        from ..lora import adapter_files
        resume = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                  "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                  "python_rng": random.getstate(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                  "step": self.step, "best": self.best, "log_history": self.log_history,
                  "world_size": self.dist.world,
                  "global_micro_batch": self.args.per_device_train_batch_size * self.dist.world}
        # a resumed run may write a checkpoint-N again: the new one replaces it
        write_folder(final, {**adapter_files(self.model, self.base), TRAINER_STATE: self._state(),
                             RESUME_STATE: lambda path: torch.save(resume, path)}, overwrite=True,
                     what="training checkpoint")
        if self.args.save_total_limit:
            keep = {self.best[1]} if self.best else set()
            ckpts = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in ckpts[:-self.args.save_total_limit]:
                if str(old) not in keep:
                    shutil.rmtree(old, ignore_errors=True)

    def resume(self, checkpoint: str) -> None:
        path = Path(checkpoint)
        if not (path / RESUME_STATE).is_file():
            raise Qwen2PureError(f"--resume_from_checkpoint {path}: no {RESUME_STATE} there (not a checkpoint-N "
                                 "folder written by qwen2-pure train)")
        load_lora_weights(self.model, path)
        state = torch.load(path / RESUME_STATE, weights_only=False)  # our own file, written by save_checkpoint
        micro = self.args.per_device_train_batch_size * self.dist.world
        if state.get("global_micro_batch", micro) != micro:
            raise Qwen2PureError(
                f"--resume_from_checkpoint {path}: it was written by a run with {state['global_micro_batch']} "
                f"examples per micro-batch over all processes ({state.get('world_size', 1)} process(es)); this one "
                f"has {micro} (--per_device_train_batch_size {self.args.per_device_train_batch_size} x "
                f"{self.dist.world} process(es)): resume with the same global micro-batch")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best, self.log_history = state["best"], state["log_history"]

    # ---- the loop ------------------------------------------------------------------------------
    def log(self, entry: dict) -> None:
        entry = {**entry, "step": self.step, "epoch": self.epoch_float()}
        self.log_history.append(entry)
        if not self.dist.main:
            return
        with open(self.out / TRAINER_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"current_steps": self.step, "total_steps": self.total_steps, **entry}) + "\n")

    def train(self) -> dict:
        from tqdm import tqdm
        args = self.args
        self.dist.barrier()  # every rank has checked output_dir before rank 0 writes into it
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if args.resume_from_checkpoint:
            self.resume(args.resume_from_checkpoint)
        self.model.train()
        accum = args.gradient_accumulation_steps
        batches = self.micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not (self.progress and self.dist.main),
                   dynamic_ncols=True)
        t0, tokens_seen, window = time.perf_counter(), 0, []
        autocast = torch.autocast(self.model.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        while self.step < self.total_steps:
            group = [next(batches) for _ in range(accum)]
            self.batch_in_epoch = group[-1][0] + 1
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for _, b in group if b is not None)
            if self.dist.enabled:
                n_tokens = int(self.dist.sum([float(n_tokens)])[0])
            loss_value, step_tokens = 0.0, 0
            for _, batch in group:
                if batch is None:  # this rank's share of the epoch's last micro-batch is empty
                    continue
                with autocast:
                    loss_sum, _ = token_loss_sum(self.model, batch)
                loss = loss_sum / max(n_tokens, 1)  # normalized over the whole accumulation window
                self.scaler.scale(loss).backward()
                loss_value += float(loss.detach())
                step_tokens += int(batch["attention_mask"].sum())
            if self.dist.enabled:
                loss_value, step_tokens = self.dist.sum([loss_value, float(step_tokens)])
                self._all_reduce_grads()
            tokens_seen += int(step_tokens)
            if not math.isfinite(loss_value):
                bar.close()
                last = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                raise Qwen2PureError(
                    f"loss became {loss_value} at step {self.step + 1}: training stopped"
                    + (f"; the last good checkpoint is {last[-1]}" if last else "")
                    + (" (fp16 overflows are common with Qwen2: try --bf16 True)" if args.fp16 else ""))
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm))
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.scheduler.get_last_lr()[0]
            # The scaler skips the update when a gradient is inf/nan, and then lowers its scale; the schedule
            # then stays where it is, as in transformers' Trainer (`if not self.accelerator.
            # optimizer_step_was_skipped: self.lr_scheduler.step()`; before accelerate, `optimizer_was_run
            # = scale_before <= scale_after`, the test used here). The step still counts.
            if self.scaler.get_scale() >= scale:
                self.scheduler.step()
            self.step += 1
            window.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if self.step % int(args.logging_steps) == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - t0
                self.log({"loss": round(sum(window) / len(window), 6), "learning_rate": lr,
                          "grad_norm": round(grad_norm, 6), "tokens_per_second": round(tokens_seen / elapsed, 2)})
                window = []
            if args.eval_strategy == "steps" and self.step % int(args.eval_steps) == 0:
                self.log({"eval_loss": round(self.evaluate(), 6)})
            if args.save_strategy == "steps" and self.step % int(args.save_steps) == 0:
                self._maybe_best()
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def _all_reduce_grads(self) -> None:
        """Sum the LoRA gradients over the ranks (one flat buffer): each rank's loss is already divided by
        the global token count, so the sum is the single process's gradient."""
        import torch.distributed as dist
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def _maybe_best(self) -> None:
        evals = [e["eval_loss"] for e in self.log_history if "eval_loss" in e and e["step"] == self.step]
        if evals and (self.best is None or evals[-1] < self.best[0]):
            self.best = (evals[-1], str(self.out / f"checkpoint-{self.step}"))

    def finish(self) -> dict:
        from ..lora import save_adapter
        args = self.args
        if args.eval_strategy != "no" and self.eval_set and not any(
                "eval_loss" in e and e["step"] == self.step for e in self.log_history):
            self.log({"eval_loss": round(self.evaluate(), 6)})
        if args.load_best_model_at_end and self.best:
            load_lora_weights(self.model, self.best[1])
        state = self._state()
        if self.dist.main:
            save_adapter(self.model, self.out, base_model_name_or_path=self.base)
            (self.out / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            if args.plot_loss:
                plot_losses(self.out, self.log_history)
        self.dist.barrier()
        return state


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style), as LLaMA-Factory plots it."""
    out, last = [], 0.0
    for i, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** i))
    return out


def plot_losses(out: Path, history: list[dict]) -> None:
    """training_loss.png and training_eval_loss.png: raw and smoothed curves against the step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Qwen2PureError("--plot_loss needs matplotlib: pip install matplotlib") from None
    for key, name in (("loss", "training_loss.png"), ("eval_loss", "training_eval_loss.png")):
        points = [(e["step"], e[key]) for e in history if key in e]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {out.name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


def train(args: TrainArgs, progress: bool = True) -> dict:
    """Train and return the final trainer state; under torchrun every rank calls this (rank 0 writes)."""
    trainer = Trainer(args, progress=progress)
    try:
        return trainer.train()
    finally:
        trainer.dist.close()
