"""A GPT on byte-level BPE tokens of Shakespeare: the char-gpt recipe with subword tokens.

``labkit train bpe-gpt`` trains it and ``labkit sample`` samples from it; notebook
``09b_pretraining`` runs it next to the character model. Everything but the data is
``labkit.course.chargpt``'s recipe and code (model preset, AdamW, warm-up + cosine schedule,
clipping, precision, evaluation, checkpoints, resume, progress): :class:`BPEGPTSettings` is a
subclass of ``CharGPTSettings`` that changes only how the text becomes token ids:

- text: the file ``text``, or labkit's packaged *complete* works (42 works, 5,057,280
  characters, ``labkit.data.shakespeare_texts("complete")`` joined by blank lines);
- split: the text is cut at the same character as char-gpt's (the first 90% trains, the last
  10% validates) *before* tokenizing, so both recipes hold out the same text;
- tokenizer: a ``labkit.data.ByteLevelBPE`` with ``vocab_size`` ids (256 bytes + merges, no
  special tokens) trained on the training part only, which then encodes each part on its own;
- windows: ``block_size`` counts tokens, so a window spans several times as many characters.

The losses are nats per token; ``val_bits_per_char`` puts the final validation loss in bits
per character, the unit in which it compares with the character model. The run directory
holds the tokenizer as a folder, ``tokenizer/`` (``ByteLevelBPE.save``: vocab.json, merges.txt
in GPT-2's format, bpe_config.json).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from labkit.course.chargpt import VAL_FRACTION, CharGPTSettings, check_splits, load_text
from labkit.data.bpe import ByteLevelBPE


@dataclass(frozen=True)
class BPEGPTSettings(CharGPTSettings):
    """One bpe-gpt run: ``CharGPTSettings`` (the same defaults) plus the BPE vocabulary.

    text: a UTF-8 text file, or None for labkit's packaged complete works of Shakespeare.
    vocab_size: ids of the ByteLevelBPE trained on the training split (>= 256: the bytes).
    """

    vocab_size: int = 2048

    recipe: ClassVar[str] = "bpe-gpt"
    label: ClassVar[str] = "BPE-GPT"
    run_format: ClassVar[str] = "labkit.bpe-gpt"
    tokenizer_file: ClassVar[str] = "tokenizer"  # a folder

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.vocab_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 256:
            raise ValueError(
                f"vocab_size must be an int >= 256 (the 256 byte tokens, then merges), "
                f"got vocab_size={size!r}"
            )

    def read_text(self) -> str:
        """The training text: the file ``text``, or labkit's complete works of Shakespeare."""
        return load_text(self.text, subset="complete")

    def tokenize(self, text: str) -> tuple[ByteLevelBPE, Tensor, Tensor, str]:
        """A ByteLevelBPE trained on the first 90% of the characters, and the ids of that part
        (N_train,) and of the last 10% (N_val,), each encoded on its own; a line for the log."""
        cut = int(len(text) * (1 - VAL_FRACTION))  # char-gpt's cut: the same held-out text
        train_text, val_text = text[:cut], text[cut:]
        tokenizer = ByteLevelBPE.train(train_text, self.vocab_size)
        train_ids, val_ids = (
            torch.tensor(tokenizer.encode(part), dtype=torch.long)
            for part in (train_text, val_text)
        )
        check_splits(train_ids, val_ids, self.block_size, self.batch_size, unit="tokens")
        source = self.text or "labkit's complete Shakespeare"
        line = (
            f"text: {source}, {len(text):,} characters; ByteLevelBPE of {tokenizer.vocab_size} "
            f"tokens trained on the train split; train {len(train_ids):,} tokens "
            f"({len(train_text) / len(train_ids):.2f} characters each) / val {len(val_ids):,} "
            f"({len(val_text) / len(val_ids):.2f})"
        )
        return tokenizer, train_ids, val_ids, line

    @staticmethod
    def tokenizer_record(tokenizer: ByteLevelBPE) -> Any:
        """A fingerprint of the merges (what checkpoints record)."""
        return hashlib.sha256(repr(tokenizer.merges).encode()).hexdigest()

    @staticmethod
    def save_tokenizer(tokenizer: ByteLevelBPE, path: Path) -> None:
        """Write the tokenizer's folder ``path``: into a temporary folder, then renamed."""
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            tokenizer.save(partial)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(partial, path)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise ValueError(f"could not write {str(path)!r}: {error.strerror or error}") from None

    @staticmethod
    def load_tokenizer(path: Path, vocab_size: int, recorded: Any) -> ByteLevelBPE:
        """The run's tokenizer, checked against the model's vocabulary size and the merges'
        fingerprint the checkpoint recorded (``recorded``, None if none)."""
        fix = "copy the run's own tokenizer folder back, or train again"
        try:
            tokenizer = ByteLevelBPE.load(path)
        except (ValueError, OSError) as error:  # names the file and line
            reason = " ".join(str(error).split())
            raise ValueError(f"{str(path)!r} holds no valid tokenizer ({reason}); {fix}") from None
        fingerprint = BPEGPTSettings.tokenizer_record(tokenizer)
        if tokenizer.vocab_size != vocab_size or recorded not in (None, fingerprint):
            raise ValueError(
                f"{str(path)!r} does not match the model ({tokenizer.vocab_size} tokens, the "
                f"model has {vocab_size}, or other merges): it is damaged or from another run; "
                f"{fix}"
            )
        return tokenizer


__all__ = ["BPEGPTSettings"]
