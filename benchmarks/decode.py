"""Decoding speed against the hardware limit: labkit's paths vs ``transformers`` vs llama.cpp.

One run, one prompt (SmolLM2-135M-Instruct's chat template around ``PROMPTS[--prompt]``: an
open-ended story by default, or ``--prompt copy``, a text to repeat, where prompt-lookup drafts
are accepted; the two show the range of speculative decoding's gain), greedy decoding
of exactly ``--new-tokens`` tokens at batch 1, every row timed in the same process except
llama.cpp (a child process in its own virtual environment). The rows alternate for
``--rounds`` rounds (reversed order every other round) and each figure is the median, so a
load that comes and goes hits every row alike. Columns:

* tokens/s (wall clock, prompt included) and CPU s per generation (``time.process_time``, all
  threads of the process);
* weight bytes read per token: every parameter and buffer a decoding step multiplies with,
  each stored tensor once (the token embedding is a row lookup and not counted, unless it is
  the tied LM head);
* the roofline (``labkit.inference``'s helpers): decoding one token reads all those bytes, so
  tokens/s can be at most ``bandwidth / bytes per token`` (``decode_ceiling``); the bandwidth
  is measured here with the decoding's thread count (``read_bandwidth``: a read-only
  STREAM-like sum of a tensor far larger than the caches; the copy figure,
  ``copy_bandwidth``, is printed too) and the last column is the fraction of that ceiling a
  row reaches;
* exact: whether the row's tokens equal ``transformers``' greedy tokens (fp32 rows should;
  other precisions change the arithmetic and say how many leading tokens agree).

labkit's rows use ``labkit.inference.FastLM`` (static KV cache, optional ``torch.compile`` of
the decoding step, fp32 / bf16 / int8 / int4 weights, speculative decoding by prompt lookup
or with an int4 copy of the model as the draft, int8 on a GPU: both keep fp32's tokens)
next to the plain ``labkit.generation.generate`` with its growing cache. llama.cpp runs the
packaged GGUF file itself (Q4_1) through ``llama-cpp-python``, which is not a dependency of
this project: install it into a separate environment (it compiles llama.cpp, several minutes)
and pass its interpreter::

    python3 -m venv /work/venv-llamacpp
    /work/venv-llamacpp/bin/pip install llama-cpp-python
    python benchmarks/decode.py --llama-python /work/venv-llamacpp/bin/python

    python benchmarks/decode.py                        # CPU, 128 tokens, all threads
    python benchmarks/decode.py --threads 1 --rounds 3 # a shared machine
    python benchmarks/decode.py --rows transformers labkit-eager fp32 --new-tokens 32

On a machine with CUDA, ``--device cuda`` times the same rows on the GPU (int4, a CPU kernel,
is skipped there); without CUDA the GPU rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from labkit.generation import SpeculativeStats, generate
from labkit.inference import (
    FastLM,
    copy_bandwidth,
    decode_ceiling,
    read_bandwidth,
    weight_bytes_per_token,
)
from labkit.models.pretrained import load, smollm2_gguf

PROMPTS = {
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "copy": "Repeat the following paragraph exactly, word for word:\n\n"
    "The lighthouse stood at the end of the rocky point, and every night for forty years "
    "the keeper climbed its one hundred and twelve steps to light the lamp. He kept a log "
    "of every ship that passed, every storm that came in from the west, and every bird that "
    "rested on the rail of the gallery. One morning in late autumn he found a green glass "
    "bottle wedged between two stones at the waterline, and inside it a letter.",
}
# labkit's FastLM rows: name -> (precision, compile, speculative)
FAST_ROWS = {
    "fp32": ("fp32", False, "none"),
    "fp32-compile": ("fp32", True, "none"),
    "fp32-compile-lookup": ("fp32", True, "prompt-lookup"),
    "fp32-compile-draft": ("fp32", True, "draft-model"),
    "bf16-compile": ("bf16", True, "none"),
    "int8-compile": ("int8", True, "none"),
    "int4-compile": ("int4", True, "none"),
}
ROWS = ("transformers", "labkit-eager", *FAST_ROWS, "llama.cpp")

LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["gguf"], n_threads=a["threads"], n_ctx=1024, verbose=False)
def run():
    out = []
    for token in llm.generate(a["ids"], top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == a["n"]:
            return out
run()  # warm-up
wall, cpu = time.perf_counter(), time.process_time()
tokens = run()
print(json.dumps({"tokens": tokens, "wall": time.perf_counter() - wall,
                  "cpu": time.process_time() - cpu}))
"""


@dataclass
class Row:
    """One implementation: how to generate, what it reads per token, what it measured.

    ``run(row)`` generates and returns the new tokens; it may record on its own row the
    speculative decoding statistics of that generation (``stats``) or a child process's own timing
    (``inner``: wall and CPU seconds without the start-up).
    """

    name: str
    run: Callable[[Row], list[int]]
    bytes_per_token: int
    compile_s: float = 0.0
    speculative: bool = False
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stats: SpeculativeStats | None = None
    inner: tuple[float, float] | None = None
    note: str = ""


def timed(row: Row) -> tuple[list[int], float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = row.run(row)
    return tokens, time.perf_counter() - wall, time.process_time() - cpu


def speculative_note(row: Row, n: int) -> str:
    """The acceptance of a speculative row's drafts (fails if the row recorded none)."""
    if row.stats is None or row.stats.forward_passes == 0:
        raise RuntimeError(f"{row.name}: the generation recorded no speculative statistics")
    s = row.stats
    drafts = f", {s.draft_passes} draft-model passes" if s.draft_passes else ""
    return (
        f"{s.accepted} of {s.proposed} draft tokens accepted ({s.acceptance_rate:.0%}), "
        f"{s.forward_passes} forward passes{drafts} for {n} tokens"
    )


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", choices=PROMPTS, default="story", help="open-ended or copy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--llama-python", help="python of an environment with llama-cpp-python")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA: torch sees no GPU on this machine; the GPU rows are skipped.")
        return 0
    if args.device == "cpu" and not torch.cuda.is_available():
        print("CUDA: no GPU on this machine; GPU rows (--device cuda) skipped.")
    device = torch.device(args.device)

    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads")
    bandwidth = read_bandwidth(threads=args.threads, device=device)
    copied = copy_bandwidth(threads=args.threads, device=device)
    print(
        f"measured memory bandwidth, {args.threads} threads: read {bandwidth / 1e9:.1f} GB/s "
        f"(sum of 512 MiB, the roofline's), copy {copied / 1e9:.1f} GB/s (read + written)"
    )

    pretrained = load("smollm2-135m-instruct", reference="transformers" in args.rows)
    model, tokenizer = pretrained.model.to(device).eval(), pretrained.tokenizer
    messages = [{"role": "user", "content": PROMPTS[args.prompt]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=device)
    n = args.new_tokens
    print(f"prompt {args.prompt!r}: {ids.shape[1]} tokens; {n} new tokens, greedy, batch 1")
    options = dict(max_new_tokens=n, min_new_tokens=n)

    rows: list[Row] = []
    for name in args.rows:
        if name == "transformers":
            hf = pretrained.reference.to(device)

            def run_hf(row: Row, hf=hf) -> list[int]:
                with torch.inference_mode():
                    out = hf.generate(ids, do_sample=False, **options)
                return out[0, ids.shape[1] :].tolist()

            rows.append(Row(name, run_hf, weight_bytes_per_token(hf)))
        elif name == "labkit-eager":

            def run_eager(row: Row) -> list[int]:
                with torch.inference_mode():
                    return generate(model, ids, **options).new_tokens[0].tolist()

            rows.append(Row("labkit eager fp32", run_eager, weight_bytes_per_token(model)))
        elif name == "llama.cpp":
            if args.llama_python is None:
                print("llama.cpp: skipped (pass --llama-python, see the docstring)")
                continue
            gguf = smollm2_gguf()
            payload = {"gguf": str(gguf), "ids": ids[0].tolist(), "n": n, "threads": args.threads}

            def run_llama(row: Row, payload=payload) -> list[int]:
                done = subprocess.run(
                    [args.llama_python, "-c", LLAMA_CPP, json.dumps(payload)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                row.inner = (result["wall"], result["cpu"])
                return result["tokens"]

            row = Row("llama.cpp Q4_1 (GGUF)", run_llama, gguf.stat().st_size)
            row.note = "bytes: the whole GGUF file"
            rows.append(row)
        else:
            precision, compiled, speculative = FAST_ROWS[name]
            if precision == "int4" and device.type != "cpu":
                print(f"{name}: skipped (int4's kernel is CPU-only)")
                continue
            fast = FastLM(model, precision=precision, compile=compiled)
            compile_s = fast.warm_up(1, ids.shape[1] + n, speculative=speculative != "none")
            extra = {}
            if speculative == "draft-model":  # int4 drafts (a CPU kernel: int8 on a GPU)
                draft = fast.draft("int4" if device.type == "cpu" else "int8")
                extra["draft_model"] = draft
                compile_s += draft.warm_up(1, ids.shape[1] + n)

            def run_fast(row: Row, fast=fast, speculative=speculative, extra=extra) -> list[int]:
                with torch.inference_mode():
                    out = fast.generate(ids, speculative=speculative, **options, **extra)
                row.stats = out.speculative  # acceptance of the drafts
                return out.new_tokens[0].tolist()

            label = f"labkit {precision} static cache" + (" + compile" if compiled else "")
            if precision in ("int8", "int4"):
                act = str(fast.activations).removeprefix("torch.")
                label = label.replace(precision, f"{precision} ({act} activations)")
            if "draft_model" in extra:
                label += f" + {extra['draft_model'].precision} draft"
            label += " + prompt lookup" if speculative == "prompt-lookup" else ""
            bytes_per_token = weight_bytes_per_token(fast.model)
            spec = speculative != "none"
            rows.append(Row(label, run_fast, bytes_per_token, compile_s, speculative=spec))

    for row in rows:  # warm-up (and the reference tokens)
        row.tokens = row.run(row)
        if row.speculative:
            row.note = speculative_note(row, n)
    for r in range(args.rounds):
        for row in rows if r % 2 == 0 else rows[::-1]:
            tokens, wall, cpu = timed(row)
            if row.inner is not None:  # llama.cpp: its own timing, without the start-up
                wall, cpu = row.inner
            assert tokens == row.tokens, f"{row.name}: greedy tokens changed between runs"
            row.walls.append(wall)
            row.cpus.append(cpu)

    reference = next((row.tokens for row in rows if row.name == "transformers"), None)
    print(f"\nrounds: {args.rounds} (medians); load average now {os.getloadavg()[0]:.1f}")
    header = (
        f"{'implementation':44}{'tokens/s':>9}{'CPU s':>8}{'compile s':>10}"
        f"{'MB/token':>10}{'ceiling t/s':>12}{'of ceiling':>11}  exact"
    )
    print(header)
    for row in rows:
        wall, cpu = statistics.median(row.walls), statistics.median(row.cpus)
        speed, ceiling = n / wall, decode_ceiling(row.bytes_per_token, bandwidth)
        if reference is None:
            exact = "-"
        else:
            same = next((i for i, (a, b) in enumerate(zip(row.tokens, reference, strict=True))
                         if a != b), n)  # fmt: skip
            exact = "yes" if same == n else f"first {same} of {n}"
        print(
            f"{row.name:44}{speed:>9.1f}{cpu:>8.2f}{row.compile_s:>10.1f}"
            f"{row.bytes_per_token / 1e6:>10.1f}{ceiling:>12.1f}{speed / ceiling:>10.0%}  {exact}"
        )
    for row in rows:
        if row.note:
            print(f"{row.name}: {row.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
