"""``TrainConfig``, every setting of a training run, and the optimizer and schedule it describes.

A config is checked when it is made (a bad value raises an error naming the field), so a
``Trainer`` never starts a run that would fail later. ``schedule_lr`` gives the learning rate of
any step before a run starts; ``param_groups`` decides which parameters get weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from labkit.train.schedules import constant_lr, cosine_lr, noam_lr

SCHEDULES = ("constant", "cosine", "noam")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
NONFINITE_POLICIES = ("raise", "skip")
CHECKPOINT_ERROR_POLICIES = ("stop", "continue")
# Device types whose parameters torch.optim.AdamW(fused=True) updates in one kernel
FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda"})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, checked when the config is made.

    Frozen, so a checked config stays valid: derive variants with
    ``dataclasses.replace(config, lr=1e-3)``, which checks again.

    Optimisation
        max_steps: optimizer steps to train for.
        batch_size: B, examples per optimizer step over all processes and micro-batches.
            Changing ``grad_accum_steps`` or the number of processes does not change the math.
        lr: the peak learning rate; with ``schedule="noam"`` a dimensionless factor on
            ``noam_lr`` instead (1.0 = the paper; the Annotated Transformer uses 1 or 2).
        weight_decay: AdamW's decoupled decay, for weight matrices only (see ``param_groups``).
        betas, eps: AdamW's moment decay rates and denominator guard (the paper: (0.9, 0.98), 1e-9).
        schedule: ``"constant"``, ``"cosine"`` (warm-up, then cosine down to ``min_lr``) or
            ``"noam"`` (needs ``d_model``); see ``labkit.train``.
        warmup_steps, min_lr, d_model: the schedule's w, lr_min and model width.
        grad_clip: clip the global gradient norm to this; None = no clipping (the norm is
            still measured and recorded).
        grad_accum_steps: k micro-batches per optimizer step; ``batch_size`` must divide by k.
        label_smoothing: for the default cross-entropy loss (the paper: 0.1).
        nonfinite: ``"raise"`` stops at a NaN/inf loss with an error naming the step;
            ``"skip"`` leaves the weights unchanged for that step and records it as skipped.

    Speed and memory
        precision: ``"fp32"``; ``"bf16"`` (autocast, CPU and recent GPUs); ``"fp16"``
            (autocast with a GradScaler, CUDA only); ``"auto"`` = bf16 on GPUs that support it
            and on CPUs with bf16 instructions (``labkit.device.bf16_hardware``, detected at
            run time), fp16 on older GPUs, fp32 elsewhere.
        activation_checkpointing: recompute each EncoderLayer/DecoderLayer in backward
            (see ``enable_activation_checkpointing``).
        compile: run the training forward through ``torch.compile``.

    Evaluation and checkpoints
        eval_every: evaluate every so many steps (always after the last step when eval data
            is given); eval_batches: micro-batches per evaluation and process (None = all).
        early_stopping_patience: stop after this many evaluations without the eval loss
            improving by more than ``min_delta``.
        checkpoint_dir: where ``step_0000123.pt`` files go (written after the last step);
            checkpoint_every: also every so many steps; keep_checkpoints: delete all but the
            newest so many and the one of the best eval loss (None = keep all). Files are
            written atomically, so a crash leaves the previous one loadable.
        on_checkpoint_error: when a checkpoint cannot be written (disk full), ``"stop"``
            raises ``CheckpointWriteError``; ``"continue"`` logs a warning and trains on.

    Run
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        seed: seeds everything when the Trainer is made, and the data order.
        shuffle: a new order of the training examples every epoch.
        progress: show a tqdm progress bar (on rank 0).
        handle_signals: the first SIGINT (Ctrl-C) or SIGTERM stops at the next step boundary,
            saves a checkpoint (with ``checkpoint_dir``) and raises ``TrainingInterrupted``;
            a second one interrupts at once. False: Python's default behaviour.
    """

    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    d_model: int | None = None
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    nonfinite: str = "raise"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every: int | None = None
    eval_batches: int | None = None
    early_stopping_patience: int | None = None
    min_delta: float = 0.0
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    on_checkpoint_error: str = "stop"
    device: str = "auto"
    seed: int = 0
    shuffle: bool = True
    progress: bool = True
    handle_signals: bool = True

    def _check(self, name: str, ok: bool, requirement: str) -> None:
        if not ok:
            raise ValueError(
                f"TrainConfig.{name} must be {requirement}, got {getattr(self, name)!r}"
            )

    def __post_init__(self) -> None:
        check = self._check
        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            check(name, _is_int(value) and value >= 1, "a positive int")
        optional_counts = (
            "d_model",
            "eval_every",
            "eval_batches",
            "early_stopping_patience",
            "checkpoint_every",
            "keep_checkpoints",
        )
        for name in optional_counts:
            value = getattr(self, name)
            check(name, value is None or (_is_int(value) and value >= 1), "None or a positive int")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            check(name, _is_int(value) and value >= 0, "an int >= 0")
        flags = ("activation_checkpointing", "compile", "shuffle", "progress", "handle_signals")
        for name in flags:
            check(name, isinstance(getattr(self, name), bool), "True or False")
        for name in ("weight_decay", "min_delta"):
            value = getattr(self, name)
            check(name, _is_number(value) and value >= 0, "a number >= 0")
        check("lr", _is_number(self.lr) and self.lr > 0, "a number > 0")
        check("eps", _is_number(self.eps) and self.eps > 0, "a number > 0")
        check(
            "min_lr",
            _is_number(self.min_lr) and 0 <= self.min_lr <= self.lr,
            f"a number in [0, lr={self.lr}]",
        )
        check(
            "label_smoothing",
            _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "a number in [0, 1)",
        )
        clip = self.grad_clip
        check("grad_clip", clip is None or (_is_number(clip) and clip > 0), "None or a number > 0")
        betas_ok = isinstance(self.betas, tuple | list) and len(self.betas) == 2
        betas_ok = betas_ok and all(_is_number(b) and 0 <= b < 1 for b in self.betas)
        check("betas", betas_ok, "two numbers in [0, 1)")
        check("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        check("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        check("nonfinite", self.nonfinite in NONFINITE_POLICIES, f"one of {NONFINITE_POLICIES}")
        check(
            "on_checkpoint_error",
            self.on_checkpoint_error in CHECKPOINT_ERROR_POLICIES,
            f"one of {CHECKPOINT_ERROR_POLICIES}",
        )
        check("device", isinstance(self.device, str), "a string such as 'auto', 'cpu', 'cuda'")
        check(
            "checkpoint_dir",
            self.checkpoint_dir is None or isinstance(self.checkpoint_dir, str | Path),
            "None or a path",
        )
        # Settings that only make sense together.
        check(
            "batch_size",
            self.batch_size % self.grad_accum_steps == 0,
            f"divisible by grad_accum_steps={self.grad_accum_steps}",
        )
        if self.schedule == "noam":
            check("d_model", self.d_model is not None, "set (the model width) for schedule='noam'")
            check("warmup_steps", self.warmup_steps >= 1, ">= 1 for schedule='noam'")
        if self.schedule == "cosine":
            check(
                "warmup_steps",
                self.warmup_steps <= self.max_steps,
                f"<= max_steps={self.max_steps} for schedule='cosine'",
            )
        check(
            "checkpoint_every",
            self.checkpoint_every is None or self.checkpoint_dir is not None,
            "None unless checkpoint_dir is set",
        )


def schedule_lr(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (from 1) under ``config``.

    For ``"noam"`` it is ``config.lr * noam_lr(step, d_model, warmup)``: noam gives the rate
    itself, so ``lr`` only scales it (1.0 = the paper). Plot a run's schedule before running it:
    ``[schedule_lr(t, config) for t in range(1, config.max_steps + 1)]``.
    """
    if config.schedule == "noam":
        return config.lr * noam_lr(step, config.d_model, config.warmup_steps)
    if config.schedule == "cosine":
        return cosine_lr(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr)
    return constant_lr(step, config.lr, config.warmup_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    """A ``LambdaLR`` that gives step t the rate ``schedule_lr(t, config)``.

    ``LambdaLR`` sets lr = (the optimizer's lr when the scheduler was made) * f(e), where e
    counts ``scheduler.step()`` calls from 0. Made on an optimizer with lr = ``config.lr``,
    step t = e + 1 needs f(e) = schedule_lr(e + 1) / config.lr.
    """
    return LambdaLR(optimizer, lambda e: schedule_lr(e + 1, config) / config.lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight matrices decay; biases, norm gains and embeddings do not.

    Decay pulls weights toward 0, which regularises the matrices that mix features but only
    hurts parameters with dim < 2 (a bias or a LayerNorm gain is a per-feature offset or scale;
    nanoGPT's rule) and embedding tables (a rare token's row would shrink every step it is
    absent). A weight tied to an embedding counts as an embedding.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # each shared (tied) tensor once
        if param.requires_grad:
            if param.dim() < 2 or id(param) in embeddings:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over ``param_groups``; the fused kernel where it exists.

    The fused implementation updates each parameter in one pass (moments, step and decay
    together) instead of several elementwise passes over all of them; PyTorch has it for
    floating-point parameters all on the CPU or all on CUDA. Its result equals the unfused
    update to rounding (tests/test_train.py).
    """
    groups = param_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("model has no parameters with requires_grad=True to train")
    params = [p for group in groups for p in group["params"]]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= FUSED_ADAMW_DEVICES
    fused = fused and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
        fused=True if fused else None,
    )
