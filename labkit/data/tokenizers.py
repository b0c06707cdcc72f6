"""Text to token ids and back: a character tokenizer and a byte-level BPE tokenizer.

Both share one API, so a notebook can swap one for the other in a single line:

- ``encode(text, add_special_tokens=False) -> list[int]`` and
  ``decode(ids, skip_special_tokens=False) -> str``;
- ``encode_batch(texts, max_length=None, padding="longest", padding_side="right")`` returns
  ``{"input_ids", "attention_mask"}`` as int64 tensors of shape ``(B, T)``; right padding for
  training, left padding for batched generation (every prompt then ends at the last column);
- ``vocab_size``, ``pad_id``/``unk_id``/``bos_id``/``eos_id``, ``save(path)``/``load(path)``.

The four special tokens have the same ids in both tokenizers: ``<pad>`` 0, ``<unk>`` 1,
``<bos>`` 2, ``<eos>`` 3. ``add_special_tokens=True`` wraps a text as ``<bos> ... <eos>``.
Special tokens only ever come from ``add_special_tokens`` or padding: a literal ``"<eos>"``
inside a text is encoded as ordinary characters, so any text round-trips.

- ``CharTokenizer``: one id per character seen in the corpus it is built from. Characters it
  never saw become ``<unk>`` (so ``decode(encode(x)) == x`` holds only for texts made of
  known characters). Tiny vocabulary, long sequences: the tokenizer of nanoGPT's
  Shakespeare.
- ``BPETokenizer``: byte-level byte-pair encoding trained with Hugging Face ``tokenizers``
  (the GPT-2 scheme). Its base alphabet is the 256 byte values, so every text, emoji and
  mojibake included, encodes without ``<unk>`` and decodes back exactly.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor

from labkit.nn.masks import pad_sequences

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0, 1, 2, 3 in every tokenizer
PADDING_SIDES = ("right", "left")
PADDING_STRATEGIES = ("longest", "max_length")
_CHAR_FORMAT = "labkit.CharTokenizer"


def _corpus_texts(corpus: str | Iterable[str]) -> list[str]:
    """The corpus as a list of strings; ValueError if it holds no text at all."""
    texts = [corpus] if isinstance(corpus, str) else list(corpus)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"corpus item {i} is a {type(text).__name__}, not a str")
    if not any(texts):
        raise ValueError(
            f"corpus is empty ({len(texts)} text(s), 0 characters): a tokenizer needs text "
            "to learn its vocabulary from"
        )
    return texts


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {str(path)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a tokenizer file (not JSON: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a tokenizer file (JSON but not an object)")
    return data


class Tokenizer(ABC):
    """What the two tokenizers share: special ids, special tokens, batching, checks.

    A subclass supplies ``_encode`` (text to ids, no special tokens), ``_decode`` (ids to
    text), ``vocab_size``, ``save`` and ``load``.
    """

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the embedding table needs this many rows."""

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def save(self, path: str | Path) -> None: ...

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path) -> Tokenizer: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` wrapped as ``<bos> ... <eos>``."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode(text)
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:
        """The text of a 1-D sequence of ids; ``skip_special_tokens`` drops pad/unk/bos/eos."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode expects a 1-D sequence of ids, got a tensor of shape "
                    f"{tuple(ids.shape)}; use decode_batch for (batch, seq)"
                )
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i >= len(SPECIAL_TOKENS)]
        return self._decode(ids)

    def decode_batch(
        self, ids: Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        """Decode each row of a ``(B, T)`` batch; pads are dropped by default."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    def encode_batch(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding: Literal["longest", "max_length"] = "longest",
        padding_side: Literal["right", "left"] = "right",
        add_special_tokens: bool = False,
    ) -> dict[str, Tensor]:
        """Encode, truncate and pad a batch into ``input_ids`` and ``attention_mask``, (B, T).

        ``max_length`` truncates every sequence to at most that many tokens, special tokens
        included (``<eos>`` is kept: the text is cut, not the wrapper). ``padding="longest"``
        pads to the longest sequence in the batch, ``"max_length"`` to ``max_length``.
        ``attention_mask`` is 1 on real tokens and 0 on pads. Left padding puts the pads
        first, which batched generation needs so that every row's next token goes in the same
        last column.
        """
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("encode_batch got an empty list of texts")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if padding not in PADDING_STRATEGIES:
            raise ValueError(f"padding must be one of {PADDING_STRATEGIES}, got {padding!r}")
        n_special = 2 if add_special_tokens else 0
        if max_length is not None and max_length < max(1, n_special):
            raise ValueError(
                f"max_length must be at least {max(1, n_special)}"
                f"{' (room for <bos> and <eos>)' if add_special_tokens else ''}, "
                f"got max_length={max_length}"
            )
        if padding == "max_length" and max_length is None:
            raise ValueError('padding="max_length" needs max_length')

        rows = []
        for text in texts:
            ids = self.encode(text)
            if max_length is not None:
                ids = ids[: max_length - n_special]
            rows.append([self.bos_id, *ids, self.eos_id] if add_special_tokens else ids)

        width = max_length if padding == "max_length" else None
        input_ids, attention_mask = pad_sequences(rows, self.pad_id, side=padding_side, width=width)
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # (B, T) each


class CharTokenizer(Tokenizer):
    """One id per character: ids 0-3 are the special tokens, then the corpus characters in
    code-point order. Unknown characters map to ``<unk>`` (id 1)."""

    def __init__(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars))
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise ValueError(f"a CharTokenizer vocabulary holds single characters, got {bad[:5]}")
        if not chars:
            raise ValueError("a CharTokenizer needs at least one character")
        self.chars = chars
        self._id_of = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}
        self._token_of = list(SPECIAL_TOKENS) + chars

    @classmethod
    def from_corpus(cls, corpus: str | Iterable[str]) -> CharTokenizer:
        """Build the vocabulary from every character in ``corpus`` (a text or many texts)."""
        chars: set[str] = set()
        for text in _corpus_texts(corpus):
            chars.update(text)
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self._token_of)

    def _encode(self, text: str) -> list[int]:
        return [self._id_of.get(c, self.unk_id) for c in text]

    def _decode(self, ids: list[int]) -> str:
        return "".join(self._token_of[i] for i in ids)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON; ``CharTokenizer.load(path)`` gives the same ids."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": _CHAR_FORMAT, "chars": self.chars}), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        data = _read_json(path)
        if data.get("format") != _CHAR_FORMAT:
            raise ValueError(
                f"{str(path)!r} is not a saved CharTokenizer (no format {_CHAR_FORMAT!r})"
            )
        return cls(data["chars"])


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) backed by a Hugging Face ``tokenizers.Tokenizer``.

    Text is read as UTF-8 bytes, each byte shown as one of 256 printable symbols; training
    then merges the most frequent adjacent pairs until ``vocab_size`` is reached.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        found = [tokenizer.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
        if found != list(SPECIAL_TOKENS):
            raise ValueError(
                f"a BPETokenizer needs the special tokens {SPECIAL_TOKENS} at ids 0-3, "
                f"found {found}"
            )
        # A literal "<eos>" typed in a text stays text; only add_special_tokens adds the token.
        tokenizer.encode_special_tokens = True
        self.hf_tokenizer = tokenizer

    @classmethod
    def from_corpus(
        cls, corpus: str | Iterable[str], vocab_size: int = 2048, min_frequency: int = 2
    ) -> BPETokenizer:
        """Train on ``corpus`` until the vocabulary has ``vocab_size`` ids (fewer if the corpus
        runs out of pairs seen at least ``min_frequency`` times)."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size must be at least {minimum} (256 byte symbols + "
                f"{len(SPECIAL_TOKENS)} special tokens), got vocab_size={vocab_size}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
        texts = _corpus_texts(corpus)
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.hf_tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.hf_tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        """Write Hugging Face's ``tokenizer.json`` format (also readable by ``transformers``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        data = _read_json(path)
        if data.get("model", {}).get("type") != "BPE":
            raise ValueError(f"{str(path)!r} is not a saved BPE tokenizer (no BPE model inside)")
        return cls(HFTokenizer.from_file(str(path)))


def load_tokenizer(path: str | Path) -> CharTokenizer | BPETokenizer:
    """Load a tokenizer saved by either class, telling them apart from the file's content."""
    data = _read_json(path)
    if data.get("format") == _CHAR_FORMAT:
        return CharTokenizer.load(path)
    if data.get("model", {}).get("type") == "BPE":
        return BPETokenizer.load(path)
    raise ValueError(f"{str(path)!r} holds neither a CharTokenizer nor a BPE tokenizer")
