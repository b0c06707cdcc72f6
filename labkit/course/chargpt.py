"""A character-level GPT on Shakespeare, nanoGPT's ``shakespeare_char`` recipe with labkit parts.

``labkit train char-gpt`` and ``labkit sample`` are thin wrappers around :func:`train` and
:func:`load_run` + :func:`sample_text`; ``benchmarks/nanogpt_char.py`` calls :func:`train` too.
The same functions run ``labkit train bpe-gpt`` (``labkit.course.bpegpt``): a recipe is its
settings class, which also says how the run reads its text and makes, saves and loads its
tokenizer (:meth:`CharGPTSettings.tokenize` and the methods next to it).

The recipe (nanoGPT ``config/train_shakespeare_char.py`` with its CPU settings, the defaults of
:class:`CharGPTSettings`):

- data: one text, one id per character (``CharTokenizer``, vocabulary built from the whole
  text); the first 90% of the ids train, the last 10% validate;
- batches: B windows of T = ``block_size`` characters at random offsets s, input
  ``ids[s : s + T]`` and target ``ids[s + 1 : s + T + 1]`` (every position predicts the next
  character): :class:`CharWindows`, which the ``Trainer`` reads in a seeded random order;
- model: ``GPT`` with ``GPTConfig.preset("nanogpt-char-cpu")`` (4 layers, 4 heads, 128 wide,
  64 positions, no biases, tied embeddings, dropout 0);
- optimisation: AdamW with betas (0.9, 0.99) and weight decay 0.1 on the matrices, peak lr 1e-3
  after 100 warm-up steps, cosine decay to 1e-4 at ``max_iters`` (2000), gradient norm clipped
  to 1.0; 12 x 64 = 768 tokens per step;
- evaluation (nanoGPT's ``estimate_loss``): the mean loss over ``eval_iters`` batches of random
  windows of each split. The windows are drawn once per run, so successive evaluations
  measure the same text and differ only by what the model learnt. The final validation loss
  is also given in bits per character (``val_bits_per_char``: the windows' nats over the
  characters their targets spell, divided by ln 2), the unit that compares tokenizers.

A run directory (``--out``) holds ``config.json`` (model config, settings and, once the run
has finished, its figures) and ``tokenizer.json``, both written when the run starts;
``checkpoints/step_0000250.pt`` (the Trainer's full state: weights, optimizer, schedule, RNG,
history, data position), written atomically at every evaluation (``checkpoint_every``), the
``keep`` newest and the best by validation loss kept; and ``checkpoint.pt``, the final state.
``train(..., resume=True)`` (``labkit train char-gpt --out DIR --resume``) continues from the
newest checkpoint and ends exactly where the uninterrupted run would have (CPU, fp32), after
checking that every setting that changes the result is the run's own. Ctrl-C or SIGTERM stops
at the next step with a checkpoint (``labkit.train.interrupts``); a damaged or foreign file is a
``ValueError`` naming it (``labkit.train``).

Differences from nanoGPT that remain: labkit's tokenizer adds 4 special tokens (never seen in
training; sampling bans them), embeddings are not weight-decayed (``labkit.train.param_groups``)
and random windows are drawn without replacement within an epoch. The MLP uses nanoGPT's exact
GELU (the preset's ``activation="gelu"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from labkit.data.bpe import ByteLevelBPE
from labkit.data.tokenizers import SPECIAL_TOKENS, CharTokenizer
from labkit.device import get_device, model_device, seed_everything
from labkit.generation import GenerationConfig, generate
from labkit.models.gpt import GPT, GPTConfig
from labkit.train.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)
from labkit.train.config import PRECISIONS, TrainConfig
from labkit.train.trainer import Trainer

VAL_FRACTION = 0.1  # nanoGPT's data/shakespeare_char/prepare.py: the last 10% of the text
RUN_FORMAT = "labkit.char-gpt"
CHECKPOINT, CONFIG, TOKENIZER = "checkpoint.pt", "config.json", "tokenizer.json"
CHECKPOINTS = "checkpoints"  # the folder of the checkpoints written during a run
CHECKPOINT_ERROR_POLICIES = ("stop", "continue")
# Settings a resumed run may change: they do not change what it computes. (Device and dtype
# are compared as what they resolve to; the text by its contents.)
RESUME_FREE = frozenset(
    {"text", "device", "dtype", "progress", "checkpoint_every", "keep", "on_checkpoint_error"}
)

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharGPTSettings:
    """One training run; the defaults are nanoGPT's shakespeare_char recipe for a CPU.

    text: a UTF-8 text file, or None for labkit's packaged tiny Shakespeare (seven tragedies,
        993,249 characters, ``labkit.data.shakespeare_texts("tiny")``).
    n_layer, n_head, n_embd, block_size, dropout: the model (block_size = context length T).
    batch_size, max_iters: B windows per optimizer step, and the number of steps.
    lr, min_lr, warmup_iters: linear warm-up to lr (capped at max_iters), cosine decay to min_lr.
    weight_decay, beta2, grad_clip: AdamW and clipping, as nanoGPT.
    eval_interval, eval_iters: evaluate every so many steps, over so many batches per split.
    seed: model initialisation, data order and evaluation windows.
    device: "auto", "cpu", "cuda", "mps". dtype: "fp32", "bf16", "fp16" or "auto"; None = fp32
        on the CPU and "auto" (bf16, or fp16 on older GPUs) elsewhere, as nanoGPT does.
    compile: run training through ``torch.compile``. progress: show a tqdm progress bar.
    checkpoint_every: write a checkpoint every so many steps (None = every evaluation);
    keep: how many of the newest checkpoints to keep (the best by validation loss is kept too);
    on_checkpoint_error: "stop" or "continue" training when a checkpoint cannot be written.

    The class is the recipe: ``recipe`` names its ``labkit train`` command, ``run_format`` marks
    its run files, and :meth:`read_text`, :meth:`tokenize`, :meth:`save_tokenizer` and
    :meth:`load_tokenizer` are what a subclass (``labkit.course.bpegpt``) changes.
    """

    recipe: ClassVar[str] = "char-gpt"
    label: ClassVar[str] = "char-GPT"  # in messages
    run_format: ClassVar[str] = RUN_FORMAT
    tokenizer_file: ClassVar[str] = TOKENIZER  # in the run directory

    text: str | None = None
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    batch_size: int = 12
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    device: str = "auto"
    dtype: str | None = None
    compile: bool = False
    progress: bool = True
    checkpoint_every: int | None = None
    keep: int = 2
    on_checkpoint_error: str = "stop"

    def __post_init__(self) -> None:
        counts = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters")
        optional = () if self.checkpoint_every is None else ("checkpoint_every",)
        for name in (*counts, "eval_interval", "eval_iters", "keep", *optional):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                "(each head gets n_embd / n_head dimensions)"
            )
        if self.warmup_iters < 0 or self.seed < 0:
            raise ValueError(
                f"warmup_iters and seed must be >= 0, got warmup_iters={self.warmup_iters}, "
                f"seed={self.seed}"
            )
        if not 0 <= self.min_lr <= self.lr or self.lr <= 0:
            raise ValueError(
                f"need 0 <= min_lr <= lr, lr > 0, got min_lr={self.min_lr}, lr={self.lr}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout}")
        if self.dtype is not None and self.dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {PRECISIONS} or None, got {self.dtype!r}")
        if self.on_checkpoint_error not in CHECKPOINT_ERROR_POLICIES:
            raise ValueError(
                f"on_checkpoint_error must be one of {CHECKPOINT_ERROR_POLICIES}, "
                f"got {self.on_checkpoint_error!r}"
            )

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The ``nanogpt-char-cpu`` preset at this run's sizes."""
        return GPTConfig.preset(
            "nanogpt-char-cpu",
            vocab_size=vocab_size,
            max_len=self.block_size,
            n_layers=self.n_layer,
            n_heads=self.n_head,
            d_model=self.n_embd,
            dropout=self.dropout,
        )

    def train_config(self, checkpoint_dir: str | Path | None = None) -> TrainConfig:
        """The ``Trainer``'s settings: AdamW (0.9, beta2), cosine schedule, clipping, precision,
        and checkpoints into ``checkpoint_dir`` (every evaluation unless ``checkpoint_every``)."""
        device = get_device(self.device)
        precision = self.dtype or ("fp32" if device.type == "cpu" else "auto")
        return TrainConfig(
            max_steps=self.max_iters,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=(0.9, self.beta2),
            schedule="cosine",
            warmup_steps=min(self.warmup_iters, self.max_iters),
            min_lr=self.min_lr,
            grad_clip=self.grad_clip,
            precision=precision,
            compile=self.compile,
            eval_every=self.eval_interval,
            eval_batches=self.eval_iters,
            device=str(device),
            seed=self.seed,
            progress=self.progress,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=None if checkpoint_dir is None else self.every_checkpoint,
            keep_checkpoints=self.keep,
            on_checkpoint_error=self.on_checkpoint_error,
        )

    @property
    def every_checkpoint(self) -> int:
        """Steps between checkpoints: ``checkpoint_every``, else ``eval_interval``."""
        return self.checkpoint_every or self.eval_interval

    # The recipe's data: what a subclass changes. -----------------------------------------

    def read_text(self) -> str:
        """The training text: the file ``text``, or labkit's tiny Shakespeare."""
        return load_text(self.text)

    def tokenize(self, text: str) -> tuple[CharTokenizer, Tensor, Tensor, str]:
        """The tokenizer (one id per character of the whole text, as nanoGPT), the train and
        validation ids (N_train,) and (N_val,), and a line describing them for the log."""
        tokenizer = CharTokenizer.from_corpus(text)
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
        train_ids, val_ids = split_ids(ids, self.block_size, self.batch_size)
        source = self.text or "labkit's tiny Shakespeare"
        line = (
            f"text: {source}, {len(ids):,} characters, vocabulary {len(tokenizer.chars)} "
            f"characters + {len(SPECIAL_TOKENS)} special; train {len(train_ids):,} / val "
            f"{len(val_ids):,}"
        )
        return tokenizer, train_ids, val_ids, line

    @staticmethod
    def tokenizer_record(tokenizer: CharTokenizer) -> Any:
        """What checkpoints record of the tokenizer, to tell its file from another run's."""
        return tokenizer.chars

    @staticmethod
    def save_tokenizer(tokenizer: CharTokenizer, path: Path) -> None:
        """Write the tokenizer to ``path`` (``tokenizer.json``), atomically."""
        _write_atomically(path, tokenizer.save)

    @staticmethod
    def load_tokenizer(path: Path, vocab_size: int, recorded: Any) -> CharTokenizer:
        """The run's tokenizer, checked against the model's vocabulary size and the characters
        the checkpoint recorded (``recorded``, None if it recorded none)."""
        fix = "copy the run's own tokenizer.json back, or train again"
        try:
            tokenizer = CharTokenizer.load(path)
        except ValueError as error:  # names the file: not JSON, not a CharTokenizer
            raise ValueError(f"{error}; {fix}") from None
        except Exception:  # JSON of the right format holding the wrong things
            raise ValueError(f"{str(path)!r} is damaged (no valid character list); {fix}") from None
        if tokenizer.vocab_size != vocab_size or (
            recorded is not None and tokenizer.chars != recorded
        ):
            raise ValueError(
                f"{str(path)!r} does not match the model ({tokenizer.vocab_size} tokens, the "
                f"model has {vocab_size}, or other characters): it is damaged or from another "
                f"run; {fix}"
            )
        return tokenizer


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_text(path: str | Path | None = None, subset: str = "tiny") -> str:
    """The text of ``path`` (UTF-8), or when None labkit's packaged Shakespeare: the works of
    ``subset`` ("tiny" or "complete", ``labkit.data.shakespeare_texts``) joined by blank lines."""
    if path is None:
        from labkit.data.corpora import shakespeare_texts

        return "\n\n".join(shakespeare_texts(subset).values())
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")


def _check_sequence(ids: Tensor, block_size: int) -> None:
    if ids.dim() != 1 or len(ids) <= block_size:
        raise ValueError(
            f"need a 1-D sequence longer than block_size={block_size}, got shape {tuple(ids.shape)}"
        )


class CharWindows(Dataset):
    """Next-token training pairs cut from one long sequence of ids (characters, or BPE tokens
    in ``labkit.course.bpegpt``).

    Item i is ``(ids[s : s + T], ids[s + 1 : s + T + 1])``, two (T,) tensors, with
    s = ``starts[i]``; by default every offset 0 .. len(ids) - T - 1 once, so a shuffled pass
    over the dataset is nanoGPT's random-offset batching (without replacement).
    """

    def __init__(self, ids: Tensor, block_size: int, starts: Tensor | None = None) -> None:
        _check_sequence(ids, block_size)
        self.ids = ids
        self.block_size = block_size
        self.starts = starts

    @classmethod
    def random(
        cls, ids: Tensor, block_size: int, n: int, generator: torch.Generator
    ) -> CharWindows:
        """``n`` windows at offsets drawn uniformly (with replacement), as nanoGPT's get_batch."""
        _check_sequence(ids, block_size)
        starts = torch.randint(len(ids) - block_size, (n,), generator=generator)
        return cls(ids, block_size, starts)

    def __len__(self) -> int:
        return len(self.ids) - self.block_size if self.starts is None else len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s = i if self.starts is None else int(self.starts[i])
        window = self.ids[s : s + self.block_size + 1]  # (T + 1,)
        return window[:-1], window[1:]


def split_ids(ids: Tensor, block_size: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """The first 90% of ``ids`` and the last 10%, each checked to hold full windows."""
    n_train = int(len(ids) * (1 - VAL_FRACTION))
    train, val = ids[:n_train], ids[n_train:]
    check_splits(train, val, block_size, batch_size)
    return train, val


def check_splits(
    train: Tensor, val: Tensor, block_size: int, batch_size: int, unit: str = "characters"
) -> None:
    """ValueError unless both splits hold a window of ``block_size`` ``unit`` (+1 target) and
    the train split at least ``batch_size`` of them."""
    for name, part in (("train", train), ("validation", val)):
        if len(part) <= block_size:
            raise ValueError(
                f"the {name} split has {len(part)} {unit}, too few for one window of "
                f"block_size={block_size} (+1 target); use a longer text or a smaller block_size"
            )
    if len(train) - block_size < batch_size:
        raise ValueError(
            f"the train split has {len(train) - block_size} windows of block_size={block_size}, "
            f"fewer than batch_size={batch_size}"
        )


@torch.no_grad()
def estimate_loss(
    model: GPT, windows: CharWindows, batch_size: int, amp_dtype: torch.dtype | None = None
) -> float:
    """Mean next-token cross-entropy over ``windows`` in batches (nanoGPT's estimate_loss), in
    eval mode; equal batches make it the mean over every predicted token."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in DataLoader(windows, batch_size=batch_size):  # (B, T) each
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).logits  # (B, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def target_characters(windows: CharWindows, tokenizer: CharTokenizer | ByteLevelBPE) -> int:
    """How many characters the targets of ``windows`` spell: one per token for characters,
    several per BPE token. Nats over these characters, divided by ln 2, are bits per character."""
    return sum(len(tokenizer.decode(windows[i][1].tolist())) for i in range(len(windows)))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class CharGPTResult:
    """What a run measured. Losses are nats per token (a character in char-gpt) over
    ``eval_iters`` batches; val_bits_per_char is the final validation loss in bits per
    character of the text its windows' targets spell.

    tokens_per_s: trained tokens per second of optimizer steps after the first
    (evaluation excluded); first_step_s: seconds of the first step, which with ``compile``
    includes compiling the model (``torch.compile`` works when first called), reported apart;
    fit_s: seconds in ``Trainer.fit`` (periodic evaluation included); wall_s: the whole run,
    from reading the text to the saved checkpoint. model (eval mode, on the run's device) and
    tokenizer are ready for :func:`sample_text`.
    """

    initial_train_loss: float
    initial_val_loss: float
    train_loss: float
    val_loss: float
    val_bits_per_char: float
    tokens_per_s: float
    first_step_s: float
    fit_s: float
    wall_s: float
    n_params: int
    vocab_size: int
    history: pd.DataFrame
    out: Path
    model: GPT
    tokenizer: CharTokenizer | ByteLevelBPE

    def figures(self) -> dict[str, float | int]:
        """The numbers only (what config.json's "results" holds)."""
        skip = ("history", "out", "model", "tokenizer")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


@contextmanager
def _show_trainer_log() -> Iterator[None]:
    """Print the Trainer's INFO lines (evaluations) above its progress bar while training."""
    trainer_log = logging.getLogger("labkit.train")
    handler, level = _TqdmHandler(), trainer_log.level
    handler.setFormatter(logging.Formatter("  %(message)s"))
    trainer_log.addHandler(handler)
    trainer_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        trainer_log.removeHandler(handler)
        trainer_log.setLevel(level)


def _text_fingerprint(text: str) -> dict[str, Any]:
    return {
        "characters": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(file)`` to a temporary file, fsync it, rename it to ``path`` (never half a file)."""
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        with open(partial, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise ValueError(f"could not write {str(path)!r}: {error.strerror or error}") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2)
    _write_atomically(path, lambda file: file.write_text(text, encoding="utf-8"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _run_identity(settings: CharGPTSettings, config: TrainConfig, text: str) -> dict[str, Any]:
    """Everything that decides what a run computes, as a resumed run must match it."""
    kept = {k: v for k, v in asdict(settings).items() if k not in RESUME_FREE}
    device_type = torch.device(config.device).type
    return {**kept, "precision": config.precision, "device": device_type, **_text_fingerprint(text)}


def _check_resumable(saved: dict[str, Any], ours: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming the first setting in which ``ours`` differs from ``saved``."""
    for key, value in ours.items():
        old = saved.get(key)
        if old == value:
            continue
        if key in ("sha256", "characters"):
            raise ValueError(
                f"cannot resume {where}: the text is not the one it was trained on "
                f"({ours['characters']:,} characters now, {saved.get('characters')} then); "
                "use the run's --text, or train into another --out"
            )
        label = {"precision": "--dtype", "device": "--device"}.get(key, _flag(key))
        raise ValueError(
            f"cannot resume {where}: it was trained with {label} {old} but this run has "
            f"{label} {value}, which changes the result; drop {label} to use the run's "
            "setting, or train into another --out"
        )


def resume_point(
    out: str | Path, recipe: type[CharGPTSettings] = CharGPTSettings
) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of the ``recipe`` run in ``out`` and what the recipe stored with
    it (``extra``: format, settings, model, tokenizer, run identity); ValueError naming the
    problem when there is none or it is unusable."""
    out = Path(out)
    latest = latest_checkpoint(out / CHECKPOINTS)
    if latest is None:
        raise ValueError(
            f"{str(out)!r} holds no checkpoint to resume from (no {CHECKPOINTS}/step_*.pt); "
            "start the run without --resume"
        )
    earlier = list_checkpoints(out / CHECKPOINTS)[:-1]
    fix = (
        f"delete it to resume from {earlier[-1].name}"
        if earlier
        else "delete the run and train again"
    )
    state = read_checkpoint(latest, fix=fix)
    extra = state.get("extra")
    if not isinstance(extra, dict) or extra.get("format") != recipe.run_format:
        raise CheckpointError(f"checkpoint {str(latest)!r} is not from a {recipe.label} run; {fix}")
    if not isinstance(extra.get("settings"), dict) or not isinstance(extra.get("identity"), dict):
        raise CheckpointError(f"checkpoint {str(latest)!r} holds no run settings; {fix}")
    return latest, extra


def saved_settings(
    out: str | Path, recipe: type[CharGPTSettings] = CharGPTSettings
) -> CharGPTSettings:
    """The settings of the ``recipe`` run in ``out``, as its newest checkpoint recorded them."""
    latest, extra = resume_point(out, recipe)
    try:
        return recipe(**extra["settings"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(latest)!r} holds bad settings ({error})") from None


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a new run needs an empty one (or overwrite)."""
    old = list_checkpoints(out / CHECKPOINTS)
    if resume or not (old or (out / CHECKPOINT).exists()):
        return
    if not overwrite:
        raise ValueError(
            f"{str(out)!r} already holds a run; continue it with --resume, start it afresh "
            "with --overwrite, or choose another --out"
        )
    for path in [*old, out / CHECKPOINT]:
        path.unlink(missing_ok=True)


def train(
    settings: CharGPTSettings,
    out: str | Path,
    log: Callable[[str], None] = print,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> CharGPTResult:
    """Train a GPT as ``settings`` say (their class is the recipe: characters for
    ``CharGPTSettings``, BPE tokens for ``labkit.course.bpegpt.BPEGPTSettings``) and save the
    run to ``out``.

    ``resume``: continue the run in ``out`` from its newest checkpoint (the settings must be
    the run's own in everything that changes the result; :func:`saved_settings` gives them).
    ``overwrite``: start afresh in a folder that holds a run (its checkpoints are deleted).
    Raises ``labkit.train.interrupts.TrainingInterrupted`` after Ctrl-C/SIGTERM (a checkpoint was
    saved) and ``labkit.train.CheckpointWriteError`` when a checkpoint cannot be written
    and ``on_checkpoint_error`` is "stop".
    """
    start = time.perf_counter()
    out = Path(out)
    _prepare_out(out, resume, overwrite)
    recipe = type(settings)
    resume_from = resume_point(out, recipe) if resume else None
    text = settings.read_text()
    tokenizer, train_ids, val_ids, description = settings.tokenize(text)
    log(description)

    config = settings.train_config(out / CHECKPOINTS)  # checks the device first
    identity = _run_identity(settings, config, text)
    if resume_from is not None:
        _check_resumable(resume_from[1]["identity"], identity, f"the run in {str(out)!r}")
    seed_everything(settings.seed)
    model = GPT(settings.model_config(tokenizer.vocab_size))
    # Evaluation windows: drawn once, from their own generator, for every evaluation.
    generator = torch.Generator().manual_seed(settings.seed)
    n_eval = settings.eval_iters * settings.batch_size
    train_sample = CharWindows.random(train_ids, settings.block_size, n_eval, generator)
    val_sample = CharWindows.random(val_ids, settings.block_size, n_eval, generator)
    trainer = Trainer(
        model, config, CharWindows(train_ids, settings.block_size), val_sample, metrics={}
    )
    run = {
        "format": recipe.run_format,
        "model": asdict(model.config),
        "settings": asdict(settings),
        "identity": identity,
    }
    trainer.checkpoint_extra = {**run, "tokenizer": recipe.tokenizer_record(tokenizer)}
    n_params = model.num_parameters()
    log(
        f"model: {n_params / 1e6:.2f}M parameters (n_layer={settings.n_layer}, "
        f"n_head={settings.n_head}, n_embd={settings.n_embd}, block_size={settings.block_size}); "
        f"device {trainer.device}, precision {config.precision}"
    )
    if trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        recipe.save_tokenizer(tokenizer, out / recipe.tokenizer_file)
        _write_json(out / CONFIG, {**run, "results": None})

    def losses() -> tuple[float, float]:
        return tuple(
            estimate_loss(model, sample, settings.batch_size, trainer.amp_dtype)
            for sample in (train_sample, val_sample)
        )

    initial = losses()  # of the freshly initialised model, also when resuming
    log(f"step 0: train loss {initial[0]:.4f}, val loss {initial[1]:.4f}")
    if resume_from is not None:
        trainer.resume(resume_from[0])
        log(f"resumed from {resume_from[0]} (step {trainer.step} of {settings.max_iters})")
    start_step = trainer.step
    fit_start = time.perf_counter()
    with _show_trainer_log():
        history = trainer.fit()
    fit_s = time.perf_counter() - fit_start
    final = losses()
    model.eval()  # ready to sample

    # The history's tokens_per_s is per step; every step trains B * T tokens. The first
    # step of this session is reported apart: with compile it includes compiling.
    tokens_per_step = settings.batch_size * settings.block_size
    step_s = tokens_per_step / history["tokens_per_s"]  # seconds of each optimizer step
    first = (history["step"] == start_step + 1).to_numpy()  # none when nothing was left to do
    steady = step_s[~first] if len(step_s) > first.sum() else step_s
    val_tokens = len(val_sample) * settings.block_size
    result = CharGPTResult(
        initial_train_loss=initial[0],
        initial_val_loss=initial[1],
        train_loss=final[0],
        val_loss=final[1],
        val_bits_per_char=final[1]
        * val_tokens
        / target_characters(val_sample, tokenizer)
        / math.log(2),
        tokens_per_s=tokens_per_step * len(steady) / steady.sum(),
        first_step_s=float(step_s[first].sum()),
        fit_s=fit_s,
        wall_s=time.perf_counter() - start,
        n_params=n_params,
        vocab_size=tokenizer.vocab_size,
        history=history,
        out=out,
        model=model,
        tokenizer=tokenizer,
    )
    trainer.save_checkpoint(out / CHECKPOINT)
    if trainer.dist.is_main:
        _write_json(out / CONFIG, {**run, "results": result.figures()})
    log(
        f"final (step {settings.max_iters}, {settings.eval_iters} batches per split): "
        f"train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f} "
        f"({result.val_bits_per_char:.4f} bits per character)"
    )
    log(
        f"speed: {result.tokens_per_s:,.0f} tokens/s in training steps after the first "
        f"({result.first_step_s:.1f} s{', compiling' if settings.compile else ''}); "
        f"wall time {result.wall_s:.1f} s (training {fit_s:.1f} s with evaluations)"
    )
    log(f"saved {CHECKPOINT}, {CONFIG}, {recipe.tokenizer_file} to {out}")
    return result


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def recipes() -> dict[str, type[CharGPTSettings]]:
    """The recipes ``labkit sample`` reads, by the format their config.json names."""
    from labkit.course.bpegpt import BPEGPTSettings  # a subclass of ours: imported late

    return {recipe.run_format: recipe for recipe in (CharGPTSettings, BPEGPTSettings)}


def _read_run_json(path: Path) -> tuple[type[CharGPTSettings], dict[str, Any]]:
    """The recipe of config.json and its contents, or a ValueError naming the file and what is
    wrong with it."""
    fix = "restore it from a backup, or train the run again"
    try:
        run = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is damaged (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is damaged (not valid JSON: {error}); {fix}") from None
    known = recipes()
    recipe = known.get(run.get("format")) if isinstance(run, dict) else None
    if recipe is None:
        raise ValueError(
            f"{str(path)!r} is not the config of a char-GPT or BPE-GPT run (no format "
            f"{' or '.join(map(repr, known))}); {fix}"
        )
    if not isinstance(run.get("model"), dict):
        raise ValueError(f"{str(path)!r} is damaged (no model settings); {fix}")
    return recipe, run


def _run_checkpoint(out: Path) -> Path | None:
    """checkpoint.pt of a finished run, else the newest checkpoint of a run under way."""
    final = out / CHECKPOINT
    return final if final.is_file() else latest_checkpoint(out / CHECKPOINTS)


def load_run(
    out: str | Path, device: str = "auto"
) -> tuple[GPT, CharTokenizer | ByteLevelBPE, dict]:
    """The trained model (eval mode, on ``device``), its tokenizer and config.json's contents,
    of a char-gpt or bpe-gpt run (config.json says which).

    Reads ``checkpoint.pt``, or the newest checkpoint of a run still under way (or
    interrupted). Each file is checked: a damaged, foreign or mismatched one (e.g. a
    checkpoint of another model size) is a ValueError naming it and what to do.
    """
    out = Path(out)
    checkpoint = _run_checkpoint(out)
    missing = [] if (out / CONFIG).is_file() else [CONFIG]
    if not missing:
        recipe, run = _read_run_json(out / CONFIG)
        missing += [] if (out / recipe.tokenizer_file).exists() else [recipe.tokenizer_file]
    missing += [CHECKPOINT] if checkpoint is None else []
    if missing:
        raise ValueError(
            f"{str(out)!r} holds no trained char-GPT or BPE-GPT run (missing "
            f"{', '.join(missing)}); train one with: labkit train char-gpt --out DIR "
            "(or bpe-gpt)"
        )
    target = get_device(device)
    state = read_checkpoint(checkpoint, map_location=target, fix="train the run again")
    where = f"checkpoint {str(checkpoint)!r}"
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(w, Tensor) for w in weights.values()):
        raise CheckpointError(f"{where} holds no model weights; train the run again")
    extra = state.get("extra") or {}
    if "model" in extra and extra["model"] != run["model"]:
        differ = sorted(k for k in run["model"] if run["model"][k] != extra["model"].get(k))
        raise ValueError(
            f"{str(out / CONFIG)!r} does not match {where} (they differ in "
            f"{', '.join(differ) or 'their fields'}): the files come from different runs or "
            "one was changed; copy the run's own config.json back, or train again"
        )
    try:
        model = GPT(GPTConfig(**run["model"]))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{str(out / CONFIG)!r} holds bad model settings ({error}); restore it or train again"
        ) from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:160]
        raise ValueError(
            f"{where} does not fit the model of {str(out / CONFIG)!r} ({reason}): it is a "
            "checkpoint of another model size or run; copy the run's own checkpoint back"
        ) from None
    tokenizer = recipe.load_tokenizer(
        out / recipe.tokenizer_file, model.config.vocab_size, extra.get("tokenizer")
    )
    return model.to(target).eval(), tokenizer, run


def _banned_ids(tokenizer: CharTokenizer | ByteLevelBPE) -> tuple[int, ...]:
    """The special tokens: never trained, so never sampled."""
    if isinstance(tokenizer, CharTokenizer):
        return tuple(range(len(SPECIAL_TOKENS)))
    return tuple(tokenizer.special_tokens.values())


def sample_text(
    model: GPT,
    tokenizer: CharTokenizer | ByteLevelBPE,
    prompt: str,
    *,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int | None = None,
) -> str:
    """``prompt`` followed by ``max_new_tokens`` sampled tokens (characters for char-gpt).

    Generation runs through ``labkit.generation.generate`` with a KV cache. The model knows
    ``max_len`` positions only, so a longer text is made in windows: once the text fills the
    context, the next window starts from its last max_len // 2 tokens (nanoGPT instead
    recomputes the last max_len tokens for every new one). The special tokens were never
    trained, so they are banned: all of them count as end-of-text and ``min_new_tokens``
    forbids ending early. ``seed`` makes the draws reproducible (window i uses seed + i).
    A character model knows only its training text's characters; a byte-level BPE model
    encodes any prompt.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one character")
    if isinstance(tokenizer, CharTokenizer):
        unknown = sorted(set(prompt) - set(tokenizer.chars))
        if unknown:
            raise ValueError(f"prompt characters {unknown} are not in the model's vocabulary")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_len = model.config.max_len
    keep = max(1, max_len // 2)
    tokens = tokenizer.encode(prompt)
    new = window = 0
    while new < max_new_tokens:
        context = tokens if len(tokens) < max_len else tokens[-keep:]
        n = min(max_new_tokens - new, max_len - len(context) + 1)
        config = GenerationConfig(
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            eos_id=_banned_ids(tokenizer),
            seed=None if seed is None else seed + window,
        )
        output = generate(model, torch.tensor([context]), config=config)
        tokens += output.new_tokens[0].tolist()
        new, window = new + n, window + 1
    return tokenizer.decode(tokens)


__all__ = [
    "CHECKPOINTS",
    "CharGPTResult",
    "CharGPTSettings",
    "CharWindows",
    "check_splits",
    "estimate_loss",
    "load_run",
    "load_text",
    "recipes",
    "resume_point",
    "sample_text",
    "saved_settings",
    "split_ids",
    "target_characters",
    "train",
]
