"""Training speed: ``labkit train char-gpt`` against nanoGPT itself, same recipe, one thread each.

Runs nanoGPT's own ``train.py`` (a checkout of karpathy/nanoGPT given by ``--nanogpt DIR``,
never part of this project) and ``labkit train char-gpt`` as child processes on nanoGPT's
corpus (``../shared/data/tinyshakespeare.txt``), alternating them ``--rounds`` times, with
``OMP_NUM_THREADS=1``. The recipe is nanoGPT's CPU command from its README::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
      --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
      --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

plus ``--always_save_checkpoint=True`` so that its checkpoint is the final model (labkit saves a
checkpoint at every evaluation too). Printed per run: CPU seconds of the child process and its
own children (user + system: what a busy machine distorts least), wall seconds, and the
validation loss of the final model over the whole validation split (every non-overlapping
window of 64 characters of the last 10%), measured afterwards by the same code for both, so
the two losses are comparable and free of the 20-batch sampling noise.

    python benchmarks/chargpt_vs_nanogpt.py --nanogpt /tmp/nanoGPT
    python benchmarks/chargpt_vs_nanogpt.py --nanogpt /tmp/nanoGPT --variants fp32 compile bf16
    python benchmarks/chargpt_vs_nanogpt.py --nanogpt /tmp/nanoGPT --max-iters 100  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BLOCK = 64
VARIANTS = {  # labkit's runs: extra flags of `labkit train char-gpt`
    "fp32": [],
    "compile": ["--compile"],
    "bf16": ["--dtype", "bf16"],
}


def nanogpt_data(text: str, folder: Path) -> None:
    """nanoGPT's shakespeare_char files (train.bin, val.bin as uint16 ids, meta.pkl), made
    from ``text`` as its prepare.py makes them: ids of the sorted characters, 90% / 10%."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(text) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``command``; (CPU seconds of it and its children, wall seconds). Output to ``log``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"error: {' '.join(command[:3])} ... failed; its output is in {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


@torch.no_grad()
def full_val_loss(logits_of, ids: torch.Tensor) -> float:
    """Mean next-character loss over every non-overlapping window of ``ids`` (N,)."""
    n = (len(ids) - 1) // BLOCK
    x = ids[: n * BLOCK].view(n, BLOCK)
    y = ids[1 : n * BLOCK + 1].view(n, BLOCK)
    total = 0.0
    for i in range(0, n, 64):
        logits = logits_of(x[i : i + 64])  # (b, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 64].flatten(), reduction="sum")
    return float(total) / y.numel()


def nanogpt_val_loss(nanogpt: Path, out: Path, data: Path) -> float:
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    state = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
    model.eval()
    ids = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    # nanoGPT's forward returns the last position's logits unless targets are given.
    return full_val_loss(lambda x: model(x, x)[0], ids)


def labkit_val_loss(out: Path, text: str) -> float:
    from labkit.course.chargpt import load_run

    model, tokenizer, _ = load_run(out, device="cpu")
    ids = torch.tensor(tokenizer.encode(text[int(len(text) * 0.9) :]), dtype=torch.long)
    return full_val_loss(lambda x: model(x).logits, ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--text", type=Path, default=CORPUS)
    parser.add_argument("--rounds", type=int, default=1, help="nanoGPT/labkit alternations")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["fp32"])
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--work", type=Path, help="folder for runs (default: a temporary one)")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        sys.exit(f"error: {str(args.nanogpt)!r} holds no nanoGPT train.py; clone karpathy/nanoGPT")
    if not args.text.is_file():
        sys.exit(f"error: corpus {str(args.text)!r} is missing; pass --text")
    work = args.work or Path(tempfile.mkdtemp(prefix="chargpt-vs-nanogpt-"))
    text = args.text.read_text(encoding="utf-8")
    data = work / "data" / "shakespeare_char"
    nanogpt_data(text, data)
    link = work / "configurator.py"  # train.py execs it from the working directory
    if not link.exists():
        link.symlink_to((args.nanogpt / "configurator.py").resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    iters, every = str(args.max_iters), str(min(250, args.max_iters))  # 250: the recipe's
    nano_cmd = [
        sys.executable, str(args.nanogpt / "train.py"),
        str(args.nanogpt / "config" / "train_shakespeare_char.py"),
        "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
        "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
        f"--eval_interval={every}", "--always_save_checkpoint=True",
    ]  # fmt: skip
    lab_cmd = [
        sys.executable, "-m", "labkit", "train", "char-gpt", "--text", str(args.text),
        "--max-iters", iters, "--eval-interval", every, "--no-progress", "--overwrite",
    ]  # fmt: skip
    cpu_name = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    print(f"machine: {cpu_name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}; one thread per run; work folder {work}")
    rows = []
    for r in range(args.rounds):
        runs = [("nanoGPT", None)] + [(f"labkit {v}", v) for v in args.variants]
        for name, variant in runs if r % 2 == 0 else runs[::-1]:
            out = work / f"{name.replace(' ', '-')}-{r}"
            if variant is None:
                cpu, wall = timed([*nano_cmd, f"--out_dir={out}"], work, env, work / "log.txt")
                loss, first = nanogpt_val_loss(args.nanogpt, out, data), float("nan")
            else:
                cmd = [*lab_cmd, "--out", str(out), *VARIANTS[variant]]
                cpu, wall = timed(cmd, work, env, work / "log.txt")
                loss = labkit_val_loss(out, text)
                results = json.loads((out / "config.json").read_text())["results"]
                first = results["first_step_s"]
            rows.append((name, r, cpu, wall, first, loss, os.getloadavg()[0]))
            print(f"  round {r}: {name:16} {cpu:7.1f} CPU s {wall:7.1f} s wall  val {loss:.4f}")

    print(f"\n{'run':18}{'round':>6}{'CPU s':>9}{'wall s':>9}{'1st step s':>11}"
          f"{'val loss':>10}{'load':>6}{'vs nanoGPT':>12}")  # fmt: skip
    nano = {r: cpu for name, r, cpu, *_ in rows if name == "nanoGPT"}
    for name, r, cpu, wall, first, loss, load in rows:
        print(f"{name:18}{r:>6}{cpu:>9.1f}{wall:>9.1f}{first:>11.1f}{loss:>10.4f}{load:>6.1f}"
              f"{nano[r] / cpu:>11.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
