"""The one training loop of the course: ``Trainer``, with AMP, accumulation, DDP, checkpoints.

Its parts live in small modules of ``labkit.train``, all importable from there: ``config`` (the
settings, optimizer and schedule), ``losses`` (cross-entropy and metrics), ``memory``
(activation checkpointing) and ``checkpoints`` (files and RNG state).

Symbols: t = optimizer step (counted from 1), B = ``batch_size``, the examples behind one
optimizer step summed over all processes and micro-batches; W = world size (processes);
k = ``grad_accum_steps``; m = B / (W k), the micro-batch one process runs at a time;
T = sequence length; V = vocabulary size or number of classes; N = the targets of the global
batch that count (those not equal to ``IGNORE_INDEX``).

One optimizer step, as :class:`Trainer` runs it::

    take k micro-batches of m examples (rank r of W gets its own slice of the global batch)
    for each micro-batch j:
        with autocast:  loss_j = (sum of its token losses) / (N / W)
        scaler.scale(loss_j).backward()         # gradients add up over j; DDP averages over W
    unscale; clip the global gradient norm to grad_clip
    optimizer.step() (skipped on a NaN/inf loss), scheduler.step()

Dividing summed token losses by the token count of the whole global batch makes the sum of
the k * W gradients exactly the gradient of the mean loss over the B examples, whatever k and
W are, even when micro-batches hold different numbers of ignored tokens. So k is a pure memory
knob, and W processes compute the same step as one.

A checkpoint holds everything that decides the next step: weights, optimizer moments,
schedule position, loss scale, the RNG states (dropout) and the data position, so a resumed
run continues exactly as the uninterrupted one would have. Checkpoints are written atomically
(``labkit.train.checkpoints``), the first Ctrl-C or SIGTERM stops at the next step boundary with a
checkpoint (``TrainingInterrupted``), and a damaged or foreign file is a ``CheckpointError``
naming it. One script serves the first start and every restart, also under
``torchrun --max-restarts``: ``fit(resume_from=latest_checkpoint(folder))``::

    config = TrainConfig(max_steps=2000, batch_size=64, lr=3e-4, schedule="cosine",
                         warmup_steps=100, eval_every=200, checkpoint_dir="runs/gpt")
    blocks = to_lm_blocks(load_shakespeare(), tokenizer, block_size=128)  # labkit.data
    trainer = Trainer(model, config, blocks["train"], blocks["validation"])
    history = trainer.fit()                 # a pandas DataFrame, one row per step
    plot_training_curves(history)         # labkit.viz: the losses, the lr on a twin axis
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, default_collate
from tqdm.auto import tqdm

from labkit.device import bf16_hardware, get_device, seed_everything
from labkit.train.checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    capture_rng_state,
    checkpoint_path,
    prune_checkpoints,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from labkit.train.config import (
    TrainConfig,
    make_optimizer,
    make_scheduler,
)
from labkit.train.distributed import (
    all_reduce_mean,
    init_distributed,
    local_device,
    make_sampler,
    wrap_model,
)
from labkit.train.interrupts import StopRequests, TrainingInterrupted
from labkit.train.losses import (
    IGNORE_INDEX,
    accuracy,
    cross_entropy_sum,
    output_logits,
    split_batch,
)
from labkit.train.memory import enable_activation_checkpointing

__all__ = ["HISTORY_COLUMNS", "Trainer"]  # the rest of the API: ``labkit.train``

logger = logging.getLogger(__name__)

Batch = Any  # whatever the collate function returns: (inputs, targets), a dict, ...
LossFn = Callable[[nn.Module, Batch], Tensor]
MetricFn = Callable[[Tensor, Tensor], float]


def _check_dataset(name: str, data: object) -> None:
    if isinstance(data, DataLoader):
        raise ValueError(
            f"{name} must be a dataset, not a DataLoader: the Trainer builds its own loaders "
            "so it can split batches across processes and resume mid-epoch"
        )
    if isinstance(data, IterableDataset) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    ):
        raise ValueError(
            f"{name} must be a map-style dataset (len(data) and data[i]), got {type(data).__name__}"
        )


def _resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether fp16 loss scaling is needed)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if device.type == "cpu":  # bf16 only pays where the CPU multiplies in bf16 itself
            precision = "bf16" if bf16_hardware(device).units else "fp32"
        elif cuda_bf16:
            precision = "bf16"
        elif device.type == "cuda":
            precision = "fp16"
        else:  # MPS: fp16 without a loss scaler can underflow, so stay safe
            precision = "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"TrainConfig.precision='fp16' needs a CUDA device (fp16 training needs loss "
            f"scaling, done by GradScaler on CUDA), got device {device}; use 'bf16' or 'fp32'"
        )
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(
            "TrainConfig.precision='bf16' but this GPU has no bfloat16 support; use 'fp16'"
        )
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[
        precision
    ]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _targets_or_none(batch: Batch) -> Tensor | None:
    """The targets of a standard batch (see ``split_batch``), None for any other batch."""
    if isinstance(batch, Mapping):
        return batch.get("labels")
    if isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


HISTORY_COLUMNS = (
    "step",
    "epoch",
    "lr",
    "train_loss",
    "grad_norm",
    "skipped",
    "tokens_per_s",
    "time_s",
)


class Trainer:
    """Trains ``model`` on ``train_data`` as ``config`` says; one process or many (torchrun).

    Args:
        model: returns logits (B, T, V) or (B, C), or an output with ``.logits``, for the
            inputs of a batch; moved to the config's device.
        config: a ``TrainConfig``.
        train_data, eval_data: map-style datasets (``len`` and indexing), e.g. a
            ``TensorDataset(x, y)`` or a ``labkit.data.to_lm_blocks`` split. The Trainer makes
            its own loaders: a seeded order per epoch that it can resume mid-epoch, and each
            process's share of the batch.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss of a micro-batch,
            instead of the default cross-entropy (with ``label_smoothing``; ``IGNORE_INDEX``
            targets ignored) of ``model(inputs)`` against ``targets``. Micro-batches then weigh
            equally, which is the big batch's mean when the loss is a per-example mean.
        metrics: ``{name: fn(logits, targets) -> float}`` for evaluation, averaged over
            batches weighted by their number of targets; default ``{"accuracy": accuracy}``
            with the default loss, none with a ``loss_fn``. They need standard batches.
        collate_fn: turns a list of examples into a batch (default: torch's
            ``default_collate``, which stacks tensors and keeps tuples and dicts).
        on_eval: ``on_eval(step, results)``, called by ``fit`` after each evaluation with the
            step and :meth:`evaluate`'s results (e.g. to report them to an Optuna trial); an
            exception it raises (e.g. ``optuna.TrialPruned``) ends ``fit`` there.

    Under torchrun each of the W processes makes the same Trainer: it joins the process
    group, wraps the model in DistributedDataParallel, reads its 1/W of every batch, and only
    rank 0 shows progress, logs and writes checkpoints. Seeds everything (``config.seed``)
    when made, so make the model first.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Any,
        eval_data: Any = None,
        *,
        loss_fn: LossFn | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        _check_dataset("train_data", train_data)
        if eval_data is not None:
            _check_dataset("eval_data", eval_data)
        elif config.eval_every is not None or config.early_stopping_patience is not None:
            raise ValueError(
                f"TrainConfig.eval_every={config.eval_every} and early_stopping_patience="
                f"{config.early_stopping_patience} need eval_data"
            )
        if config.early_stopping_patience is not None and config.eval_every is None:
            raise ValueError(
                f"TrainConfig.early_stopping_patience={config.early_stopping_patience} needs "
                "eval_every, so that there is more than one evaluation to compare"
            )
        if on_eval is not None and not callable(on_eval):
            raise ValueError(f"on_eval must be callable, got {type(on_eval).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if metrics is None:
            metrics = {"accuracy": accuracy} if loss_fn is None else {}
        if not isinstance(metrics, Mapping) or not all(
            isinstance(name, str) and name != "loss" and callable(fn)
            for name, fn in metrics.items()
        ):
            raise ValueError(
                f"metrics must map names (other than 'loss') to functions (logits, targets) "
                f"-> float, got {metrics!r}"
            )
        self.config = config
        self.train_data = train_data
        self.eval_data = eval_data
        self.loss_fn = loss_fn
        self.metrics = dict(metrics)
        self.collate_fn = collate_fn or default_collate
        self.on_eval = on_eval

        # Where and how: device, processes, precision, batch split.
        device = get_device(config.device)
        self.dist = init_distributed(device)
        self.device = local_device(device, self.dist)
        self.amp_dtype, use_scaler = _resolve_precision(config.precision, self.device)
        shards = self.dist.world_size * config.grad_accum_steps
        if config.batch_size % shards:
            raise ValueError(
                f"TrainConfig.batch_size={config.batch_size} must be divisible by world_size="
                f"{self.dist.world_size} x grad_accum_steps={config.grad_accum_steps}"
            )
        self.micro_batch_size = config.batch_size // shards

        seed_everything(config.seed)
        self.model = model.to(self.device)
        if config.activation_checkpointing and enable_activation_checkpointing(self.model) == 0:
            raise ValueError(
                "TrainConfig.activation_checkpointing=True but the model has no EncoderLayer "
                "or DecoderLayer; call enable_activation_checkpointing(model, block_types=...)"
            )
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = make_scheduler(self.optimizer, config)
        # Disabled (a pass-through) unless fp16, so one code path serves every precision.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        wrapped = wrap_model(self.model, self.dist, self.device)
        self._ddp = wrapped if isinstance(wrapped, DistributedDataParallel) else None
        self._train_model = torch.compile(wrapped) if config.compile else wrapped

        # The order of epoch e is a permutation drawn from (seed, e) alone. One process reads
        # it through a DistributedSampler with one replica, so its batch of step t is the union
        # of the W processes' batches of step t in a torchrun run.
        sampler = make_sampler(train_data, self.dist, shuffle=config.shuffle, seed=config.seed)
        if sampler is None:
            sampler = DistributedSampler(
                train_data, num_replicas=1, rank=0, shuffle=config.shuffle, seed=config.seed
            )
        self._sampler = sampler
        self.batches_per_epoch = len(self._sampler) // self.micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"train_data has {len(train_data)} examples, fewer than one batch of "
                f"batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps}"
            )

        # The run's state besides the modules; a checkpoint saves all of it.
        self.step = 0  # optimizer steps done
        self.epoch = 0  # the epoch being read
        self.batches_seen = 0  # micro-batches of this epoch already used (per process)
        self.best_eval_loss: float | None = None
        self.best_step: int | None = None  # the step of best_eval_loss
        self.evals_without_improvement = 0
        self.stopped_early = False
        self._records: list[dict[str, Any]] = []
        self._elapsed = 0.0  # seconds spent in fit, over all sessions of this run
        self._batch_iter: Iterator[Batch] | None = None
        self._step_under_way = 1
        # Saved with every checkpoint under "extra" (e.g. a recipe's settings), never read back.
        self.checkpoint_extra: dict[str, Any] = {}

    # --- data ---------------------------------------------------------------------------

    def _epoch_batches(self) -> Iterator[Batch]:
        """This process's micro-batches from the current position to the end of the epoch."""
        self._sampler.set_epoch(self.epoch)  # the permutation is a function of (seed, epoch)
        m = self.micro_batch_size
        order = list(self._sampler)[self.batches_seen * m : self.batches_per_epoch * m]
        loader = DataLoader(
            self.train_data,
            batch_size=m,
            sampler=order,
            collate_fn=self.collate_fn,
            # Its own generator: otherwise every new loader iterator draws a seed from the
            # global RNG, and a run resumed mid-epoch would shift all later dropout masks.
            generator=torch.Generator(),
        )
        return iter(loader)

    def _take_micro_batches(self) -> list[Batch]:
        batches = []
        for _ in range(self.config.grad_accum_steps):
            if self.batches_seen == self.batches_per_epoch:
                self.epoch, self.batches_seen, self._batch_iter = self.epoch + 1, 0, None
            if self._batch_iter is None:
                self._batch_iter = self._epoch_batches()
            batches.append(next(self._batch_iter))
            self.batches_seen += 1
        return batches

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    # --- training -----------------------------------------------------------------------

    def _loss_denominator(self, batches: list[Batch], step: int) -> float:
        """What each micro-batch's loss is divided by so the k micro-batches (and W processes)
        sum to the mean over the global batch: N / W targets, or k for a ``loss_fn``."""
        if self.loss_fn is not None:
            return float(len(batches))
        local = sum(int((split_batch(b)[1] != IGNORE_INDEX).sum()) for b in batches)
        per_process = all_reduce_mean(local, self.dist)  # N / W; DDP's average divides by W
        if per_process == 0:
            raise ValueError(
                f"step {step}: every target of the batch is IGNORE_INDEX={IGNORE_INDEX}, so "
                "the loss is undefined"
            )
        return per_process

    def _micro_loss(self, batch: Batch) -> Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(self._train_model, batch)
            if not (isinstance(loss, Tensor) and loss.dim() == 0):
                raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r}")
            return loss
        inputs, targets = split_batch(batch)
        logits = output_logits(self._train_model(inputs))
        return cross_entropy_sum(logits, targets, self.config.label_smoothing)[0]

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step over k micro-batches; returns its history record."""
        config, step = self.config, self.step + 1
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        batches = self._take_micro_batches()
        denominator = self._loss_denominator(batches, step)

        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for j, batch in enumerate(batches):
            batch = _to_device(batch, self.device)
            # DDP all-reduces gradients in every backward; only the last one needs it.
            last = j == len(batches) - 1
            skip_sync = self._ddp is not None and not last
            with self._ddp.no_sync() if skip_sync else contextlib.nullcontext():
                with self._autocast():
                    loss = self._micro_loss(batch) / denominator
                self.scaler.scale(loss).backward()
            losses.append(loss.detach())
        train_loss = all_reduce_mean(torch.stack(losses).sum().item(), self.dist)  # one sync

        self.scaler.unscale_(self.optimizer)  # true gradients, so grad_clip means what it says
        max_norm = math.inf if config.grad_clip is None else config.grad_clip
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()  # pre-clip
        # Under fp16 an inf gradient is the GradScaler's business: it skips the step itself.
        finite = math.isfinite(train_loss) and (
            self.scaler.is_enabled() or math.isfinite(grad_norm)
        )
        if not finite and config.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss {train_loss} (gradient norm {grad_norm}) at step {step}; "
                "lower lr, set grad_clip, or pass TrainConfig(nonfinite='skip') to skip such steps"
            )
        scale = self.scaler.get_scale()
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = not finite or self.scaler.get_scale() < scale  # a lower scale = fp16 skipped
        # A skipped step still counts: the schedule stays a function of the step number. (torch
        # warns when the very first steps were skipped, which is intended here.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step = step

        targets = [_targets_or_none(b) for b in batches]
        if all(t is not None for t in targets):
            tokens = sum(t.numel() for t in targets) * self.dist.world_size
        else:  # a custom batch: no way to know what to count
            tokens = math.nan
        return {
            "step": step,
            "epoch": self.epoch + self.batches_seen / self.batches_per_epoch,  # epochs of data
            "lr": lr,
            "train_loss": train_loss,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "tokens_per_s": tokens / (time.perf_counter() - start),
        }

    def fit(self, resume_from: str | Path | None = None) -> pd.DataFrame:
        """Train until ``max_steps`` (or early stopping); returns :attr:`history`.

        With ``resume_from`` (a checkpoint file), first restore that run's state (see
        :meth:`resume`), so the result is that of the uninterrupted run.

        With ``config.handle_signals`` the first SIGINT (Ctrl-C) or SIGTERM finishes the step
        under way, saves a checkpoint there (with a ``checkpoint_dir``; under torchrun every
        rank stops at the same step) and raises :class:`TrainingInterrupted`; ``fit()`` again
        continues exactly. A second signal raises ``KeyboardInterrupt`` at once; ``fit()``
        again then continues from the last finished step (the interrupted one's batches are
        skipped). A checkpoint that cannot be written raises ``CheckpointWriteError`` or, with
        ``on_checkpoint_error="continue"``, logs a warning and training goes on.
        """
        if resume_from is not None:
            self.resume(resume_from)
        config = self.config
        self._train_model.train()
        clock = time.perf_counter() - self._elapsed
        bar = tqdm(
            total=config.max_steps,
            initial=self.step,
            unit="step",
            desc="training",
            disable=not (config.progress and self.dist.is_main),
        )
        announce = self._announce_stop if self.dist.is_main else None
        with bar, StopRequests(config.handle_signals, announce) as stop:
            while self.step < config.max_steps and not self.stopped_early:
                self._step_under_way = self.step + 1  # what a stop signal lets finish
                record, results = self._train_step(), None
                if self.eval_data is not None and self._due(config.eval_every):
                    results = self.evaluate()
                    record.update({f"eval_{name}": value for name, value in results.items()})
                    self._track_early_stopping(results["loss"])
                self._elapsed = time.perf_counter() - clock
                record["time_s"] = self._elapsed
                self._records.append(record)
                if results is not None and self.on_eval is not None:
                    self.on_eval(self.step, results)  # may raise, e.g. optuna.TrialPruned
                saved = None
                if config.checkpoint_dir is not None and (
                    self.stopped_early or self._due(config.checkpoint_every)
                ):
                    saved = self._save_during_fit()
                shown = ("train_loss", "eval_loss", "lr")
                bar.set_postfix({key: f"{record[key]:.4g}" for key in shown if key in record})
                bar.update()
                finished = self.step == config.max_steps or self.stopped_early
                if self._stop_requested(stop) and not finished:
                    if config.checkpoint_dir is not None and saved is None:
                        saved = self._save_during_fit()
                    raise TrainingInterrupted(self.step, saved, stop.signum or signal.SIGTERM)
        return self.history

    def _announce_stop(self, signum: int) -> str:
        what = "saving a checkpoint" if self.config.checkpoint_dir is not None else "stopping"
        return (
            f"\nlabkit: {signal.Signals(signum).name} received: {what} when step "
            f"{self._step_under_way} ends; press Ctrl-C again to stop at once"
        )

    def _stop_requested(self, stop: StopRequests) -> bool:
        """Whether any process received a stop signal (one all-reduce under torchrun, so all
        ranks stop after the same step)."""
        requested = float(stop.signum is not None)
        return all_reduce_mean(requested, self.dist) > 0 if self.dist.enabled else bool(requested)

    def _save_during_fit(self) -> Path | None:
        try:
            return self.save_checkpoint()
        except CheckpointWriteError as error:
            if self.config.on_checkpoint_error == "stop":
                raise
            logger.warning("%s; training goes on (on_checkpoint_error='continue')", error)
            return None

    def _due(self, every: int | None) -> bool:
        """True after every ``every``-th step and after the last one."""
        last = self.step == self.config.max_steps
        return last or (every is not None and self.step % every == 0)

    def _track_early_stopping(self, eval_loss: float) -> None:
        config = self.config
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss - config.min_delta:
            self.best_eval_loss = eval_loss
            self.best_step = self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        patience = config.early_stopping_patience
        if patience is not None and self.evals_without_improvement >= patience:
            self.stopped_early = True
            if self.dist.is_main:
                logger.info(
                    "early stop at step %d: eval loss has not beaten %.4g for %d evaluations",
                    self.step,
                    self.best_eval_loss,
                    patience,
                )

    # --- evaluation ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics on ``eval_data``: ``{"loss": ..., "accuracy": ..., ...}``.

        The loss is the training objective (with label smoothing), averaged over targets (or
        over batches for a ``loss_fn``). Each process evaluates its 1/W of the data in
        micro-batches (``eval_batches`` of them at most) and the totals are combined, so every
        process returns the same numbers. Under torchrun the last (len % W) examples are
        dropped, so that every process has the same number.
        """
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_data: Trainer(model, config, train, eval_data)")
        sampler = make_sampler(self.eval_data, self.dist, shuffle=False, seed=self.config.seed)
        loader = DataLoader(
            self.eval_data,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
        )
        was_training = self.model.training
        self.model.eval()
        totals = dict.fromkeys(["loss", "loss_weight", "targets", *self.metrics], 0.0)
        for batch in islice(loader, self.config.eval_batches):
            batch = _to_device(batch, self.device)
            with self._autocast():
                if self.loss_fn is not None:  # a mean per batch: batches weigh equally
                    totals["loss"] += self.loss_fn(self.model, batch).item()
                    totals["loss_weight"] += 1
                if self.loss_fn is None or self.metrics:
                    inputs, targets = split_batch(batch)
                    logits = output_logits(self.model(inputs))
                    count = (targets != IGNORE_INDEX).sum().item()
                    if self.loss_fn is None:  # a sum over targets: targets weigh equally
                        loss, _ = cross_entropy_sum(logits, targets, self.config.label_smoothing)
                        totals["loss"] += loss.item()
                        totals["loss_weight"] += count
                    for name, fn in self.metrics.items():
                        totals[name] += float(fn(logits, targets)) * count
                    totals["targets"] += count
        self.model.train(was_training)

        # Each total averaged over processes: the ratios below are then over all processes.
        totals = {key: all_reduce_mean(value, self.dist) for key, value in totals.items()}
        if totals["loss_weight"] == 0 or (self.metrics and totals["targets"] == 0):
            raise ValueError(
                f"eval_data gave no batches, or only targets equal to IGNORE_INDEX={IGNORE_INDEX}"
            )
        results = {"loss": totals["loss"] / totals["loss_weight"]}
        results.update({name: totals[name] / totals["targets"] for name in self.metrics})
        if self.dist.is_main:
            logger.info(
                "step %d eval: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in results.items())
            )
        return results

    # --- history ------------------------------------------------------------------------

    @property
    def history(self) -> pd.DataFrame:
        """One row per optimizer step: step, epoch (epochs of data seen), lr (of that step),
        train_loss, grad_norm (before clipping), skipped, tokens_per_s (targets per second over
        all processes: tokens for a language model, examples for a classifier), time_s (since
        the run began, evaluation included) and, on evaluation steps, eval_loss and eval_<metric>
        (NaN on the other steps)."""
        if not self._records:
            return pd.DataFrame(columns=list(HISTORY_COLUMNS))
        return pd.DataFrame.from_records(self._records)

    # --- checkpoints --------------------------------------------------------------------

    def _data_signature(self) -> dict[str, Any]:
        """What must match for a checkpoint's data position to mean the same examples."""
        return {
            "batch_size": self.config.batch_size,
            "grad_accum_steps": self.config.grad_accum_steps,
            "world_size": self.dist.world_size,
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "train_examples": len(self.train_data),
        }

    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Write the run's full state to ``path`` (default ``checkpoint_dir/step_0000123.pt``).

        Only rank 0 writes (other ranks return None). The file is written under a temporary
        name, fsync-ed and renamed, so a crash never leaves a half-written checkpoint; a failed
        write raises ``CheckpointWriteError`` and leaves the previous files as they were. With
        ``keep_checkpoints`` the older files of ``checkpoint_dir`` are deleted, except the
        newest ``keep_checkpoints`` and the one of the best eval loss.
        """
        if path is None:
            if self.config.checkpoint_dir is None:
                raise ValueError("save_checkpoint() needs a path or TrainConfig.checkpoint_dir")
            path = checkpoint_path(self.config.checkpoint_dir, self.step)
        path = Path(path)
        if not self.dist.is_main:
            return None
        config = asdict(self.config)
        config["checkpoint_dir"] = (
            None if config["checkpoint_dir"] is None else str(config["checkpoint_dir"])
        )
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batches_seen": self.batches_seen,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "history": self._records,
            "best_eval_loss": self.best_eval_loss,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "stopped_early": self.stopped_early,
            "elapsed_s": self._elapsed,
            "data": self._data_signature(),
            "device_type": self.device.type,
            "config": config,  # resuming checks it against this Trainer's own config
            "extra": self.checkpoint_extra,
        }
        write_checkpoint(state, path)
        keep, directory = self.config.keep_checkpoints, self.config.checkpoint_dir
        if keep is not None and directory is not None and path.parent == Path(directory):
            best = [] if self.best_step is None else [checkpoint_path(directory, self.best_step)]
            prune_checkpoints(directory, keep, protect=best)
        logger.info("saved checkpoint %s", path)
        return path

    def resume(self, path: str | Path, *, strict: bool = True) -> None:
        """Restore the run saved in ``path``; the next ``fit()`` continues it exactly.

        Restores weights, optimizer moments, schedule, loss scale, RNG states, data position,
        history and early-stopping state. Batch size, accumulation, world size, seed, shuffle
        and the number of training examples must match the saved run, or the data position
        would point at other examples. With ``strict`` every other setting that changes the
        result (all of ``TrainConfig`` but the checkpoint, progress and signal options) and
        the device type must match too; ``strict=False`` resumes anyway (e.g. with a larger
        ``max_steps``). A damaged, foreign or mismatched file raises ``CheckpointError`` (a
        ``ValueError``) naming it.
        """
        path = Path(path)
        where = f"checkpoint {str(path)!r}"
        state = read_checkpoint(path, map_location=self.device)
        _check_trainer_state(state, where)
        for key, value in self._data_signature().items():
            if state["data"].get(key) != value:
                raise CheckpointError(
                    f"{where} was written with {key}={state['data'].get(key)!r} "
                    f"but this Trainer has {key}={value!r}"
                )
        if strict:
            self._check_same_settings(state, where)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise CheckpointError(
                f"{where} does not fit this model: {_one_line(error)}; it comes from a model of "
                "another size or kind"
            ) from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            restore_rng_state(state["rng"])
            self._records = [dict(record) for record in state["history"]]
        except Exception as error:  # a file of the right shape holding wrong pieces
            raise CheckpointError(
                f"{where} holds a damaged Trainer state ({_one_line(error)}); delete it and "
                "resume from an earlier checkpoint, or train again"
            ) from None
        self.step, self.epoch, self.batches_seen = (
            state["step"],
            state["epoch"],
            state["batches_seen"],
        )
        self._batch_iter = None  # rebuilt at the saved position
        self.best_eval_loss = state["best_eval_loss"]
        self.best_step = state.get("best_step")
        self.evals_without_improvement = state["evals_without_improvement"]
        self.stopped_early = state["stopped_early"]
        self._elapsed = state["elapsed_s"]

    def _check_same_settings(self, state: dict[str, Any], where: str) -> None:
        saved, ours = state.get("config"), asdict(self.config)
        if not isinstance(saved, dict):
            raise CheckpointError(f"{where} holds no TrainConfig to compare with")
        for name, value in ours.items():
            if name in RESUME_FREE_SETTINGS or name not in saved:
                continue
            old = saved[name]
            if _comparable(old) != _comparable(value):
                raise CheckpointError(
                    f"{where} was written with TrainConfig.{name}={old!r} but this Trainer has "
                    f"{name}={value!r}; resume with the run's own settings to continue it "
                    "exactly (or resume(strict=False))"
                )
        device_type = state.get("device_type", self.device.type)
        if device_type != self.device.type:
            raise CheckpointError(
                f"{where} was trained on {device_type} but this Trainer runs on "
                f"{self.device.type}; the numbers would differ (resume(strict=False) to go on)"
            )


# Settings that do not change what a run computes: a resumed run may change them.
RESUME_FREE_SETTINGS = frozenset(
    {
        "checkpoint_dir",
        "checkpoint_every",
        "keep_checkpoints",
        "on_checkpoint_error",
        "progress",
        "handle_signals",
        "device",  # compared as the device type actually used
    }
)
_STATE_TYPES = {
    "step": int,
    "epoch": int,
    "batches_seen": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "rng": dict,
    "history": list,
    "evals_without_improvement": int,
    "stopped_early": bool,
    "elapsed_s": float,
    "data": dict,
}


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    line = " ".join(part.strip() for part in lines[:2]) if lines else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_trainer_state(state: dict[str, Any], where: str) -> None:
    """Raise ``CheckpointError`` unless ``state`` has the keys and types a Trainer saves."""
    missing = [key for key in _STATE_TYPES if key not in state]
    if missing:
        bare = bool(state) and all(isinstance(v, Tensor) for v in state.values())
        hint = (
            ": it is a bare state_dict (load it with model.load_state_dict)"
            if bare
            else f" (no {', '.join(missing[:4])})"
        )
        raise CheckpointError(f"{where} is not a checkpoint of labkit's Trainer{hint}")
    for key, kind in _STATE_TYPES.items():
        value = state[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (kind is int and value < 0):
            raise CheckpointError(
                f"{where} holds a damaged Trainer state ({key} is {value!r:.40}); delete it and "
                "resume from an earlier checkpoint, or train again"
            )
    if not all(isinstance(v, Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{where} holds a damaged Trainer state (model weights)")
