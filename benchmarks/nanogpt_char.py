"""nanoGPT's Shakespeare character model, CPU recipe, on nanoGPT's own corpus: labkit vs README.

Trains with exactly the code path of ``labkit train char-gpt`` (``labkit.course.chargpt.train``) on
``../shared/data/tinyshakespeare.txt`` (the char-rnn "tiny Shakespeare", 1,115,394 characters,
the text behind nanoGPT's figures), then prints the validation loss, tokens per second and wall
time next to nanoGPT's published CPU figure: "This still runs in about ~3 minutes, but gets us
a loss of only 1.88" (nanoGPT README, quick start, for ``--device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``).

The recipe is ``CharGPTSettings``' defaults; only the losses are estimated over 200 batches
per split instead of 20 (nanoGPT's own default, less noisy).

    python benchmarks/nanogpt_char.py                       # 2000 steps on the CPU
    python benchmarks/nanogpt_char.py --threads 1           # a CPU shared with other jobs
    python benchmarks/nanogpt_char.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from labkit.course.chargpt import PRECISIONS, CharGPTSettings, sample_text, train

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_VAL_LOSS = 1.88  # nanoGPT README, CPU run of train_shakespeare_char
NANOGPT_MINUTES = 3  # "about ~3 minutes" (the README's machine: a laptop CPU)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=CORPUS, help=f"default: {CORPUS}")
    parser.add_argument("--out", default=str(REPO / "build" / "nanogpt-char"))
    parser.add_argument("--max-iters", type=int, default=CharGPTSettings.max_iters)
    parser.add_argument("--eval-iters", type=int, default=200, help="batches per loss estimate")
    parser.add_argument("--seed", type=int, default=CharGPTSettings.seed)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=PRECISIONS, default=None)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.text.is_file():
        sys.exit(
            f"error: nanoGPT's corpus {str(args.text)!r} is missing; this benchmark needs that "
            "exact text (../shared/data/tinyshakespeare.txt next to the repository) to compare "
            "with nanoGPT's figure, or pass --text"
        )

    settings = CharGPTSettings(
        text=str(args.text),
        max_iters=args.max_iters,
        eval_iters=args.eval_iters,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    result = train(settings, args.out, overwrite=True)  # a benchmark starts afresh each time

    train_steps_s = settings.max_iters * settings.batch_size * settings.block_size
    train_steps_s /= result.tokens_per_s
    verdict = "meets" if result.val_loss <= NANOGPT_VAL_LOSS else "MISSES"
    print()
    print(f"{'':24}{'labkit':>12}{'nanoGPT README':>18}")
    print(f"{'val loss':24}{result.val_loss:>12.4f}{NANOGPT_VAL_LOSS:>18.2f}")
    print(f"{'train loss':24}{result.train_loss:>12.4f}{'-':>18}")
    print(f"{'tokens/s (train steps)':24}{result.tokens_per_s:>12,.0f}{'-':>18}")
    print(f"{'train steps time (s)':24}{train_steps_s:>12.1f}{'-':>18}")
    print(f"{'wall time (s)':24}{result.wall_s:>12.1f}{f'~{NANOGPT_MINUTES * 60}':>18}")
    print(f"val loss {result.val_loss:.4f} {verdict} the target <= {NANOGPT_VAL_LOSS}")

    model = result.model
    print("\nsample (temperature 0.8, top-k 200, seed 1337):")
    print(sample_text(model, result.tokenizer, "\n", max_new_tokens=300, seed=1337))
    return 0 if result.val_loss <= NANOGPT_VAL_LOSS else 1


if __name__ == "__main__":
    sys.exit(main())
