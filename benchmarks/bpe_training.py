"""BPE training time: labkit's pure-Python ByteLevelBPE vs Hugging Face ``tokenizers`` (Rust).

Both train a byte-level BPE on the complete works of Shakespeare (42 texts, ~5 MB, package
``shakespeare``) with GPT-2's pre-tokenization pattern, for each vocabulary size. For labkit the
time is split into counting pre-tokens (``count_pretokens``, ``--workers`` processes) and the
merge loop (``train_merges``); merges/s is merges divided by the merge loop's time. For
``tokenizers`` (``BpeTrainer``, ``ByteLevel`` pre-tokenizer with its GPT-2 regex, the 256 bytes
as initial alphabet, ``RAYON_NUM_THREADS`` = ``--workers``) only the total is measurable. CPU
seconds (this process and its finished children) are printed too: on a shared machine they
move less than wall time.
The last column is how many of the first 100 merges the two agree on: they count the same pairs
but break ties differently (labkit: the greatest byte pair; tokenizers: the smallest ids).

    python benchmarks/bpe_training.py                    # vocab 1000, 4000, 8000; 2 workers
    python benchmarks/bpe_training.py --vocab 4000 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

from labkit.data import shakespeare_texts
from labkit.data.bpe import GPT2_PATTERN, ByteLevelBPE, count_pretokens, str_to_token, train_merges


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_labkit(texts: list[str], vocab_size: int, workers: int) -> dict:
    cpu, start = cpu_seconds(), time.perf_counter()
    counts = count_pretokens(texts, GPT2_PATTERN, workers=workers)
    counted = time.perf_counter()
    vocab, merges = train_merges(counts, vocab_size - 256)
    done = time.perf_counter()
    return {
        "merges": merges,
        "count_s": counted - start,
        "merge_s": done - counted,
        "total_s": done - start,
        "cpu_s": cpu_seconds() - cpu,
        "pretokens": len(counts),
    }


def train_hf(texts: list[str], vocab_size: int) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    cpu, start = cpu_seconds(), time.perf_counter()
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return {"merges": merges, "total_s": seconds, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[1000, 4000, 8000])
    parser.add_argument("--workers", type=int, default=2, help="processes / Rayon threads")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face tokenizers")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # read when tokenizers starts its pool

    texts = list(shakespeare_texts("complete").values())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(
        f"corpus: {len(texts)} texts, {n_bytes / 1e6:.2f} MB; workers {args.workers}; "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    # A whole tokenizer, once, to time train() itself as a learner calls it.
    start = time.perf_counter()
    ByteLevelBPE.train(texts, args.vocab[0], workers=args.workers)
    print(f"ByteLevelBPE.train(vocab={args.vocab[0]}): {time.perf_counter() - start:.1f} s")

    header = (
        "| vocab | merges | labkit count (s) | labkit merges (s) | labkit total (s) | merges/s "
        "| labkit CPU (s) | tokenizers (s) | tokenizers CPU (s) | labkit / tokenizers "
        "| same first 100 merges |"
    )
    print(header)
    print("|" + " ---: |" * 11)
    for vocab_size in args.vocab:
        ours = train_labkit(texts, vocab_size, args.workers)
        n_merges = len(ours["merges"])
        row = [
            f"{vocab_size}",
            f"{n_merges}",
            f"{ours['count_s']:.1f}",
            f"{ours['merge_s']:.1f}",
            f"{ours['total_s']:.1f}",
            f"{n_merges / ours['merge_s']:.0f}",
            f"{ours['cpu_s']:.1f}",
        ]
        if args.no_hf:
            row += ["-", "-", "-", "-"]
        else:
            hf = train_hf(texts, vocab_size)
            theirs = [tuple(str_to_token(p) for p in m) for m in hf["merges"][:100]]
            same = sum(a == b for a, b in zip(ours["merges"][:100], theirs, strict=False))
            row += [
                f"{hf['total_s']:.1f}",
                f"{hf['cpu_s']:.1f}",
                f"{ours['total_s'] / hf['total_s']:.1f}x",
                f"{same}",
            ]
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
