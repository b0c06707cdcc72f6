"""Byte-level BPE from scratch: train, encode, decode, and read GPT-2 / Hugging Face files.

The scheme of GPT-2 (and of SmolLM2, Llama 3, GPT-4, ...), written to be read:

1. **Bytes.** Text is UTF-8 encoded; the 256 byte values are the first 256 tokens, so every
   string encodes, whatever its script, with no unknown token.
2. **Pre-tokenization.** A regular expression (``GPT2_PATTERN`` by default) cuts the text into
   pre-tokens: words with their leading space, runs of digits, runs of punctuation, runs of
   whitespace. Merges never cross a pre-token boundary, so ``" dog"`` and ``" dog."`` share the
   token ``" dog"``.
3. **Merges.** Training repeatedly finds the most frequent adjacent pair of tokens (counted
   over the pre-tokens, each weighted by how often it occurs) and adds their concatenation as a
   new token. Ties go to the **lexicographically greatest pair of byte strings**, so training is
   deterministic. Encoding replays the merges in the order they were learned (rank), always
   applying the lowest-rank pair present in a pre-token first.
4. **Special tokens** (``"<|endoftext|>"``) are cut out of the text before anything else,
   matched longest-first; they are never split, never merged and never learned from.

Vocabulary ids: bytes ``0..255`` (id = byte value), then one id per merge in order, then the
special tokens. A tokenizer built from files or from Hugging Face keeps the ids it was given.

Training is fast enough for a few MB in pure Python: pre-tokens are counted once (optionally
in several processes), and after each merge only the pre-tokens that contain the merged pair are
recounted (``_Trainer``). ``tests/test_bpe.py`` checks it against a brute-force trainer that
recounts everything each merge, merge for merge, and checks ``from_hf`` against SmolLM2's
Hugging Face tokenizer id for id.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import regex

# GPT-2's pre-tokenizer (also SmolLM2's, via Hugging Face's ByteLevel pre-tokenizer): English
# contractions, letters with an optional leading space, digits, punctuation, whitespace runs
# (the last space of a run stays with the next word: "a   b" -> "a", "  ", " b").
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k_base): case-insensitive contractions, digits in groups of at most three.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
EOS_TOKEN = "<|endoftext|>"  # GPT-2's and SmolLM2's end of document
# Cut points that are pre-token boundaries for the patterns above: after a newline that sits
# between two non-space characters. Used to split a long text into chunks (training in several
# processes, streaming in encode_iterable) without changing its pre-tokens.
_SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, used in ``vocab.json``/``merges.txt``.

    Printable Latin-1 bytes map to themselves (``"a"`` is ``"a"``); the 68 others (control
    bytes, space, ...) map to ``chr(256 + n)`` in byte order, which is why a space shows as
    ``"Ġ"`` (byte 32 -> U+0120) and a newline as ``"Ċ"``.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    """A token's bytes in GPT-2's printable alphabet (``b" the"`` -> ``"Ġthe"``)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str, where: str = "") -> bytes:
    """The bytes of a token written in GPT-2's alphabet; ValueError for a foreign character."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        bad = next(c for c in text if c not in table)
        raise ValueError(
            f"{where}token {text!r} has the character {bad!r} (U+{ord(bad):04X}), which is not "
            "in GPT-2's byte alphabet (bytes_to_unicode)"
        ) from None


# ----------------------------------------------------------------------------------------------
# Pre-tokenization and counting
# ----------------------------------------------------------------------------------------------


def _special_regex(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """One alternation of the special tokens, longest first, so that at any position the
    longest special token wins (``"<|a|><|a|>"`` before ``"<|a|>"``)."""
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    if not ordered:
        return None
    return regex.compile("|".join(regex.escape(s) for s in ordered))


def _split_specials(text: str, specials: regex.Pattern | None) -> Iterator[tuple[str, bool]]:
    """``(piece, is_special)`` for the text between special tokens and the tokens themselves."""
    if specials is None:
        if text:
            yield text, False
        return
    start = 0
    for match in specials.finditer(text):
        if match.start() > start:
            yield text[start : match.start()], False
        yield match.group(), True
        start = match.end()
    if start < len(text):
        yield text[start:], False


def _chunks(text: str, n: int) -> list[str]:
    """``text`` cut into about ``n`` pieces at safe cut points (see ``_SAFE_CUT``)."""
    if n <= 1 or len(text) < 2 * n:
        return [text]
    pieces, start = [], 0
    for k in range(1, n):
        match = _SAFE_CUT.search(text, max(start, k * len(text) // n))
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return [p for p in pieces if p]


def count_pretokens(
    texts: Iterable[str], pattern: str = GPT2_PATTERN, workers: int = 1
) -> Counter[str]:
    """How often each pre-token occurs in ``texts`` (special tokens already removed).

    ``workers > 1`` cuts the texts into about four chunks per worker at safe cut points (see
    ``_SAFE_CUT``) and counts them in that many processes; the counts are the same.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    texts = list(texts)
    if workers == 1:
        compiled = regex.compile(pattern)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(compiled.findall(text))
        return counts
    total = max(sum(map(len, texts)), 1)
    jobs = []
    for text in texts:
        jobs += _chunks(text, max(1, round(4 * workers * len(text) / total)))
    counts = Counter()
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_count_chunk, [(job, pattern) for job in jobs]):
            counts.update(part)
    return counts


def _count_chunk(args: tuple[str, str]) -> Counter[str]:  # top level: picklable for processes
    text, pattern = args
    return count_pretokens([text], pattern)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class _Trainer:
    """BPE training with incremental pair counts.

    ``words[i]`` is pre-token ``i`` as a list of token ids and ``freq[i]`` how often it occurs.
    ``pair_count[(a, b)]`` is the number of times ``a`` is followed by ``b`` over all pre-tokens
    (weighted by frequency), and ``where[(a, b)]`` the pre-tokens that (may) hold the pair. A
    merge of ``(a, b)`` rewrites only the pre-tokens in ``where[(a, b)]``: their old pairs are
    subtracted, their new pairs added. The most frequent pair comes from a heap of
    ``(-count, a, b)`` entries; an entry whose count is out of date is skipped when popped.
    """

    def __init__(self, pretoken_counts: dict[str, int]) -> None:
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        self.words = [list(w.encode("utf-8")) for w in pretoken_counts]
        self.freq = list(pretoken_counts.values())
        self.pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
        self.where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for i, (word, f) in enumerate(zip(self.words, self.freq, strict=True)):
            for pair in pairwise(word):
                self.pair_count[pair] += f
                self.where[pair].add(i)
        self.heap = [(-c, a, b) for (a, b), c in self.pair_count.items()]
        heapq.heapify(self.heap)

    def best_pair(self) -> tuple[int, int] | None:
        """The most frequent pair; ties: the lexicographically greatest ``(bytes, bytes)``."""
        heap, counts = self.heap, self.pair_count
        while heap and counts.get((heap[0][1], heap[0][2]), 0) != -heap[0][0]:
            heapq.heappop(heap)  # stale entry
        if not heap or heap[0][0] == 0:
            return None
        top = heap[0][0]
        tied = set()
        while heap and heap[0][0] == top:
            _, a, b = heapq.heappop(heap)
            if counts.get((a, b), 0) == -top:
                tied.add((a, b))
        best = max(tied, key=lambda p: (self.vocab[p[0]], self.vocab[p[1]]))
        for a, b in tied:  # the others stay candidates
            if (a, b) != best:
                heapq.heappush(heap, (top, a, b))
        return best

    def merge(self, pair: tuple[int, int], new_id: int) -> None:
        """Replace every ``pair`` by ``new_id`` and update the counts of the pairs it touches."""
        a, b = pair
        self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        changed = set()
        for i in self.where.pop(pair, ()):
            word, f = self.words[i], self.freq[i]
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            if len(merged) == len(word):
                continue  # a stale entry of `where`: this pre-token lost the pair earlier
            for p in pairwise(word):
                self.pair_count[p] -= f
                changed.add(p)
            for p in pairwise(merged):
                self.pair_count[p] += f
                self.where[p].add(i)
                changed.add(p)
            self.words[i] = merged
        self.pair_count.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            count = self.pair_count[p]
            if count > 0:
                heapq.heappush(self.heap, (-count, *p))
            else:
                del self.pair_count[p]


def train_merges(
    pretoken_counts: dict[str, int], n_merges: int
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn up to ``n_merges`` merges from pre-token counts: ``(vocab, merges)`` with the 256
    bytes at ids 0-255 and merge ``k`` at id ``256 + k`` (fewer when no pair is left)."""
    trainer = _Trainer(pretoken_counts)
    merges = []
    for k in range(n_merges):
        pair = trainer.best_pair()
        if pair is None:
            break
        merges.append((trainer.vocab[pair[0]], trainer.vocab[pair[1]]))
        trainer.merge(pair, 256 + k)
    return trainer.vocab, merges


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------


class ByteLevelBPE:
    """A byte-level BPE tokenizer: ``vocab`` (id -> bytes), ranked ``merges``, special tokens.

    Args:
        vocab: ``{id: token bytes}``. Every merge's two parts and their concatenation must be
            in it; the single bytes usually are (a byte with no id cannot be encoded).
        merges: ``[(left, right), ...]`` in the order they were learned; the index is the rank.
        special_tokens: strings matched in the text before pre-tokenization and kept whole. One
            already in ``vocab`` (as its UTF-8 bytes) keeps its id; the others get new ids
            after the largest one.
        pattern: the pre-tokenization regex (``regex`` module syntax).

    Attributes ``vocab``, ``merges``, ``special_tokens`` (``{token: id}``) and ``pattern`` hold
    what the tokenizer was built from.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Iterable[str] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> None:
        self.vocab: dict[int, bytes] = {}
        for i, token in vocab.items():
            if not isinstance(i, int) or i < 0:
                raise ValueError(f"vocab ids must be non-negative ints, got {i!r}")
            if not isinstance(token, bytes | bytearray):
                raise ValueError(f"vocab[{i}] must be bytes, got {type(token).__name__}")
            self.vocab[i] = bytes(token)
        self.id_of: dict[bytes, int] = {}
        for i, token in self.vocab.items():
            if token in self.id_of:
                raise ValueError(f"vocab ids {self.id_of[token]} and {i} hold the same {token!r}")
            self.id_of[token] = i

        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        # (left id, right id) -> (rank, merged id): all that encoding needs.
        self._rank: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            for part in (a, b, a + b):
                if part not in self.id_of:
                    raise ValueError(
                        f"merge {rank} ({a!r}, {b!r}): {part!r} is not in the vocabulary"
                    )
            self._rank.setdefault((self.id_of[a], self.id_of[b]), (rank, self.id_of[a + b]))

        self.special_tokens: dict[str, int] = {}
        for token in special_tokens or ():
            if not isinstance(token, str) or not token:
                raise ValueError(f"special tokens must be non-empty strings, got {token!r}")
            raw = token.encode("utf-8")
            if raw not in self.id_of:
                new_id = max(self.vocab, default=-1) + 1
                self.vocab[new_id] = raw
                self.id_of[raw] = new_id
            self.special_tokens[token] = self.id_of[raw]
        self.pattern = pattern
        self._pretokenizer = regex.compile(pattern)
        self._specials = _special_regex(self.special_tokens)
        self._max_special = max(map(len, self.special_tokens), default=0)
        self._cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return (
            f"ByteLevelBPE(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={list(self.special_tokens)})"
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids (the embedding table needs ``max id + 1`` rows)."""
        return max(self.vocab, default=-1) + 1

    @property
    def eos_id(self) -> int | None:
        """The id of ``"<|endoftext|>"`` when it is a special token (GPT-2's document
        separator; ``labkit.data.to_lm_blocks(..., add_eos=True)`` appends it), else None."""
        return self.special_tokens.get(EOS_TOKEN)

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text_or_iterable: str | Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        pattern: str = GPT2_PATTERN,
        *,
        workers: int = 1,
    ) -> ByteLevelBPE:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from a text (or many texts).

        Special tokens are cut out of the text first: they split it (no merge spans one) and
        are not counted. Each text of an iterable is pre-tokenized on its own. ``workers > 1``
        counts the pre-tokens in that many processes (the result is the same). Training stops
        early if no adjacent pair is left, giving a smaller vocabulary.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        minimum = 256 + len(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(
                f"vocab_size must be at least {minimum} (256 byte tokens + "
                f"{len(special_tokens)} special tokens), got vocab_size={vocab_size!r}"
            )
        texts = [text_or_iterable] if isinstance(text_or_iterable, str) else text_or_iterable
        specials = _special_regex(special_tokens)
        pieces = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {i} is a {type(text).__name__}, not a str")
            pieces += [p for p, special in _split_specials(text, specials) if not special]
        counts = count_pretokens(pieces, pattern, workers)
        vocab, merges = train_merges(counts, vocab_size - minimum)
        return cls(vocab, merges, special_tokens, pattern)

    # ------------------------------------------------------------------------------------------
    # Encoding and decoding
    # ------------------------------------------------------------------------------------------

    def _encode_pretoken(self, pretoken: str) -> list[int]:
        """BPE on one pre-token: apply the lowest-rank merge present until none applies."""
        cached = self._cache.get(pretoken)
        if cached is not None:
            return cached
        ids = []
        for byte in pretoken.encode("utf-8"):
            token_id = self.id_of.get(bytes([byte]))
            if token_id is None:
                raise ValueError(
                    f"byte 0x{byte:02X} of {pretoken!r} has no token in this vocabulary "
                    f"(it lacks {256 - sum(bytes([b]) in self.id_of for b in range(256))} of "
                    "the 256 bytes), so the text cannot be encoded"
                )
            ids.append(token_id)
        rank = self._rank
        while len(ids) > 1:
            best = min((rank[pair] for pair in pairwise(ids) if pair in rank), default=None)
            if best is None:
                break
            merged_id, merged, j = best[1], [], 0
            pair = next(p for p in pairwise(ids) if rank.get(p) == best)
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == pair:
                    merged.append(merged_id)
                    j += 2
                else:
                    merged.append(ids[j])
                    j += 1
            ids = merged
        if len(self._cache) < 1_000_000:
            self._cache[pretoken] = ids
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``: special tokens (longest first), then BPE on each pre-token.

        ``add_special_tokens`` exists for the interface of ``labkit.data`` and Hugging
        Face (``labkit.generation`` passes ``False``); this tokenizer wraps nothing around a
        text, so ``True`` raises ValueError.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if add_special_tokens:
            raise ValueError(
                "ByteLevelBPE adds no <bos>/<eos> around a text; write the special tokens into "
                "the text (e.g. text + '<|endoftext|>') or append eos_id yourself"
            )
        ids: list[int] = []
        for piece, special in _split_specials(text, self._specials):
            if special:
                ids.append(self.special_tokens[piece])
            else:
                for pretoken in self._pretokenizer.findall(piece):
                    ids += self._encode_pretoken(pretoken)
        return ids

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Stream the ids of the concatenated strings (e.g. the lines of an open file).

        Equal to ``encode("".join(iterable))``: text is buffered and encoded up to the last
        safe cut (after a newline between two non-space characters, not inside a special
        token), so memory stays bounded by the longest stretch without such a newline.
        """
        buffer = ""
        for text in iterable:
            buffer += text
            cut = self._last_safe_cut(buffer)
            if cut:
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
        if buffer:
            yield from self.encode(buffer)

    def _last_safe_cut(self, text: str) -> int:
        """The last safe cut of ``text`` (0 if none): a pre-token boundary after which the
        special-token matches cannot change when more text arrives."""
        limit = len(text) - self._max_special  # a special starting before it is fully visible
        covered = []
        if self._specials is not None:
            covered = [m.span() for m in self._specials.finditer(text)]
        for match in reversed(list(_SAFE_CUT.finditer(text, 0, max(limit, 0)))):
            cut = match.start()
            if 0 < cut <= limit and not any(s < cut < e for s, e in covered):
                return cut
        return 0

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 (a cut sequence) become U+FFFD.

        ``skip_special_tokens`` leaves the special tokens out (as ``labkit.generation`` asks).
        """
        if skip_special_tokens:
            special_ids = set(self.special_tokens.values())
            ids = [i for i in ids if int(i) not in special_ids]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``; ValueError for an id outside the vocabulary."""
        out = []
        for i in ids:
            token = self.vocab.get(int(i))
            if token is None:
                raise ValueError(
                    f"unknown token id {i!r}: the vocabulary holds {len(self.vocab)} ids "
                    f"in [0, {self.vocab_size})"
                )
            out.append(token)
        return b"".join(out)

    # ------------------------------------------------------------------------------------------
    # Files: GPT-2's vocab.json + merges.txt
    # ------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``vocab.json`` and ``merges.txt`` in GPT-2's format (plus ``bpe_config.json``
        with the special tokens and the pattern); :meth:`load` reads all three back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = {token_to_str(t): i for i, t in sorted(self.vocab.items())}
        (directory / "vocab.json").write_text(
            json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8"
        )
        lines = ["#version: 0.2"] + [f"{token_to_str(a)} {token_to_str(b)}" for a, b in self.merges]
        (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {"special_tokens": list(self.special_tokens), "pattern": self.pattern}
        (directory / "bpe_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> ByteLevelBPE:
        """A tokenizer written by :meth:`save`."""
        directory = Path(directory)
        config_path = directory / "bpe_config.json"
        config = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
        return cls.from_files(
            directory / "vocab.json",
            directory / "merges.txt",
            special_tokens=config.get("special_tokens"),
            pattern=config.get("pattern", GPT2_PATTERN),
        )

    @classmethod
    def from_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        special_tokens: Iterable[str] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> ByteLevelBPE:
        """Read GPT-2's ``vocab.json`` (token in the byte alphabet -> id) and ``merges.txt``
        (``left right`` per line, rank = order, an optional ``#version`` first line).

        ValueError names the file and the line of anything malformed.
        """
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        for path in (vocab_json, merges_txt):
            if not path.is_file():
                raise FileNotFoundError(f"no file at {str(path)!r}")
        raw = vocab_json.read_text(encoding="utf-8")
        try:
            entries = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{vocab_json} line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
            ) from None
        if not isinstance(entries, dict):
            raise ValueError(f"{vocab_json}: expected a JSON object {{token: id}}")

        def line_of(key: str) -> int:
            at = raw.find(json.dumps(key, ensure_ascii=False))
            if at < 0:
                at = raw.find(json.dumps(key))
            return raw.count("\n", 0, max(at, 0)) + 1

        vocab: dict[int, bytes] = {}
        for key, i in entries.items():
            problem = None
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                problem = f"the id of {key!r} must be a non-negative int, got {i!r}"
            elif i in vocab:
                problem = f"id {i} is given twice"
            else:
                try:
                    vocab[i] = str_to_token(key)
                except ValueError as err:
                    problem = str(err)
            if problem is not None:  # the line is looked up only for the message
                raise ValueError(f"{vocab_json} line {line_of(key)}: {problem}")

        merges = []
        id_of = {t: i for i, t in vocab.items()}
        for number, line in enumerate(merges_txt.read_text(encoding="utf-8").split("\n"), 1):
            line = line.rstrip("\r")
            if not line or (number == 1 and line.startswith("#version")):
                continue
            where = f"{merges_txt} line {number}: "
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{where}expected two tokens separated by one space, got {line!r}")
            a, b = (str_to_token(p, where) for p in parts)
            for part in (a, b, a + b):
                if part not in id_of:
                    raise ValueError(
                        f"{where}{token_to_str(part)!r} of the merge {line!r} is not in "
                        f"{vocab_json.name}"
                    )
            merges.append((a, b))
        return cls(vocab, merges, special_tokens, pattern)

    @classmethod
    def from_hf(cls, tokenizer: Any) -> ByteLevelBPE:
        """Rebuild a Hugging Face byte-level BPE tokenizer: vocabulary, merges, pre-tokenizer
        regex and added (special) tokens.

        ``tokenizer`` is a ``tokenizers.Tokenizer`` or a ``transformers`` fast tokenizer (e.g.
        ``labkit.models.pretrained.load("smollm2-135m-instruct").tokenizer``). What this class
        cannot reproduce (a normalizer, a prefix space, byte fallback, other models) raises
        ValueError.
        """
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "to_str"):
            raise ValueError(
                f"from_hf expects a tokenizers.Tokenizer or a fast transformers tokenizer, got "
                f"{type(tokenizer).__name__}"
            )
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"not a BPE tokenizer (model type {model.get('type')!r})")
        if spec.get("normalizer") is not None:
            raise ValueError(f"the tokenizer has a normalizer ({spec['normalizer'].get('type')})")
        if (
            model.get("byte_fallback")
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
        ):
            raise ValueError("byte_fallback / subword prefixes / word suffixes are not byte-level")
        if model.get("ignore_merges"):
            raise ValueError("ignore_merges=True (whole words looked up first) is not supported")
        pattern = cls._hf_pattern(spec.get("pre_tokenizer"))

        vocab = {i: str_to_token(token, "vocab: ") for token, i in model["vocab"].items()}
        merges = []
        for merge in model["merges"]:
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            merges.append((str_to_token(a, "merges: "), str_to_token(b, "merges: ")))
        specials = []
        for added in spec.get("added_tokens", []):
            raw = added["content"].encode("utf-8")
            if vocab.get(added["id"], raw) != raw:
                raise ValueError(f"added token {added['content']!r} clashes with id {added['id']}")
            vocab[added["id"]] = raw
            specials.append(added["content"])
        return cls(vocab, merges, specials, pattern)

    @staticmethod
    def _hf_pattern(pre: dict | None) -> str:
        """The regex of a ByteLevel pre-tokenizer (or of Split + ByteLevel without regex)."""
        if pre is None:
            raise ValueError("the tokenizer has no pre-tokenizer (not byte-level)")
        steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
        byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
        splits = [s for s in steps if s.get("type") == "Split"]
        if len(byte_level) != 1 or len(steps) != len(byte_level) + len(splits):
            raise ValueError(f"unsupported pre-tokenizer {[s.get('type') for s in steps]}")
        if byte_level[0].get("add_prefix_space"):
            raise ValueError("ByteLevel(add_prefix_space=True) is not supported")
        if byte_level[0].get("use_regex", True):
            if splits:
                raise ValueError("both a Split and ByteLevel's own regex: not supported")
            return GPT2_PATTERN
        if len(splits) != 1 or splits[0].get("behavior") != "Isolated":
            raise ValueError("expected one Split(behavior='Isolated') before ByteLevel")
        return splits[0]["pattern"].get("Regex") or regex.escape(splits[0]["pattern"]["String"])


def bytes_per_token(tokenizer: ByteLevelBPE, text: str) -> float:
    """Compression: UTF-8 bytes of ``text`` per token (higher = fewer tokens)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("bytes_per_token needs a non-empty text")
    return len(text.encode("utf-8")) / len(ids)
