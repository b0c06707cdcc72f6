"""Synthetic sequence-to-sequence tasks of chosen size and difficulty, with seeded splits.

- ``make_sequence_task``: copy, reverse or sort a sequence of symbols.
- ``make_addition_task``: "123+45" -> "168".
- ``make_date_task``: a date in one of several written formats -> ISO 8601 ("1999-03-03").

Each returns a ``DatasetDict`` with ``train``, ``validation`` and ``test`` splits whose sources
are distinct: no source is in two splits.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Sequence

from datasets import Dataset, DatasetDict, Features, Value

from labkit.data.corpora import _check_fractions, _split_indices


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
