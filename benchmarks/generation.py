"""Generation speed, memory and quality of labkit's Llama on SmolLM2-135M-Instruct.

Four sections, each printed as a table (``--sections`` picks some):

* ``vs-hf``: labkit vs ``transformers`` greedy decoding of the same chat-templated prompt in one
  process (same threads, batch 1, a warm-up run each, then ``--repeats`` runs alternating
  between the two, medians); both must produce the same tokens.
* ``kv``: generation time with and without the KV cache vs generated length.
* ``batch``: generated tokens per second vs batch size.
* ``precision``: float32 vs bfloat16 vs int8 weights (weight-only ``Int8Linear``, and on the
  CPU also ``torch.ao``'s dynamic int8): bytes, tokens/s, perplexity on held-out Shakespeare
  (the test split of ``load_shakespeare("tiny")``) and how many greedy tokens agree with
  float32.

    python benchmarks/generation.py                     # SmolLM2 on the CPU, 128 new tokens
    python benchmarks/generation.py --device cuda
    python benchmarks/generation.py --quick --model tiny   # smoke check, a few seconds

``--model tiny`` uses a random 2-layer ``transformers`` Llama copied into labkit (byte ids, no
tokenizer), so the whole script runs without loading SmolLM2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import pandas as pd
import torch
import transformers

from labkit.data import load_shakespeare
from labkit.device import get_device
from labkit.inference import (
    compare_precisions,
    kv_cache_speedup,
    memory_estimate,
    throughput_vs_batch,
    time_call,
    time_generation,
)
from labkit.models.llama import Llama

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SECTIONS = ("vs-hf", "kv", "batch", "precision")


class Setup(NamedTuple):
    """The models and token ids a benchmark run uses."""

    model: Llama
    reference: transformers.LlamaForCausalLM
    prompt_ids: torch.Tensor  # (1, T)
    eval_ids: torch.Tensor  # (N,) held-out Shakespeare
    tokenizer: Any  # None for the tiny model (byte ids)


def _held_out_text(chars: int) -> str:
    return "".join(load_shakespeare("tiny")["test"]["text"])[:chars]


def load_setup(name: str, device: torch.device, eval_chars: int) -> Setup:
    text = _held_out_text(eval_chars)
    if name == "tiny":
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        reference = transformers.LlamaForCausalLM(config).eval()
        prompt_ids = torch.tensor([list(PROMPT.encode())])
        eval_ids = torch.tensor(list(text.encode()))
        model, tokenizer = Llama.from_hf(reference), None
    else:
        from labkit.models.pretrained import load

        model, tokenizer, reference = load("smollm2-135m-instruct", reference=True)
        messages = [{"role": "user", "content": PROMPT}]
        chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = torch.tensor([tokenizer.encode(chat, add_special_tokens=False)])
        eval_ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    return Setup(model.to(device), reference.to(device), prompt_ids, eval_ids, tokenizer)


def _hf_generate(hf: transformers.PreTrainedModel, ids: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy decoding of exactly n tokens; returns the (1, n) new tokens."""
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=hf.config.eos_token_id,
        )
    return out[:, ids.shape[1] :]


def labkit_vs_transformers(setup: Setup, n: int, repeats: int) -> pd.DataFrame:
    """Median wall and process-CPU seconds of both greedy decoders, runs interleaved.

    One warm-up call each (which also checks that the tokens are identical), then the two
    alternate, so a change in the machine's load hits both alike. With one thread the CPU
    seconds hardly depend on other processes, the wall seconds do.
    """
    ids = setup.prompt_ids.to(next(setup.model.parameters()).device)
    runs = {
        "labkit": lambda: (
            time_generation(setup.model, ids, max_new_tokens=n, repeats=1, warmup=0).tokens
        ),
        "transformers": lambda: _hf_generate(setup.reference, ids, n),
    }
    tokens = {name: run().cpu() for name, run in runs.items()}
    same = torch.equal(tokens["labkit"], tokens["transformers"])
    if setup.tokenizer is not None:
        print("labkit:", repr(setup.tokenizer.decode(tokens["labkit"][0])[:200]))
    if not same:
        raise AssertionError("labkit and transformers generated different tokens")
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            cpu_start = time.process_time()
            wall[name].append(time_call(run, repeats=1, warmup=0).seconds)
            cpu[name].append(time.process_time() - cpu_start)
    seconds = {name: statistics.median(times) for name, times in wall.items()}
    return pd.DataFrame(
        {
            "seconds": seconds,
            "tokens_per_s": {name: n / t for name, t in seconds.items()},
            "cpu_seconds": {name: statistics.median(times) for name, times in cpu.items()},
            "identical_tokens": dict.fromkeys(runs, same),
        }
    ).rename_axis("implementation")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke check")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 8 if args.quick else args.new_tokens
    repeats = 1 if args.quick else args.repeats
    lengths = (4, 8) if args.quick else (16, 32, 64, 128)
    batches = (1, 2) if args.quick else (1, 2, 4, 8)
    device = get_device(args.device)

    setup = load_setup(args.model, device, eval_chars=1_000 if args.quick else 20_000)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"model={args.model} device={device} torch={torch.__version__} "
        f"transformers={transformers.__version__} threads={torch.get_num_threads()} "
        f"load average (1, 5, 15 min)={load}"
    )
    estimate = memory_estimate(setup.model, batch=1, seq_len=setup.prompt_ids.shape[1] + n)
    print(
        f"prompt {setup.prompt_ids.shape[1]} tokens, {n} new; weights {estimate.params_bytes:,} B,"
        f" KV cache {estimate.kv_cache_bytes:,} B at batch 1"
    )
    pd.set_option("display.width", 120)
    pd.set_option("display.float_format", "{:.3f}".format)

    if "vs-hf" in sections:
        print(f"\n# Greedy decoding, batch 1, {n} new tokens: labkit vs transformers")
        print(labkit_vs_transformers(setup, n, repeats).to_string())
    if "kv" in sections:
        print("\n# KV cache: generation time with and without it")
        table = kv_cache_speedup(setup.model, setup.prompt_ids, lengths, repeats)
        print(table.to_string(index=False))
        if not table["identical"].all():
            raise AssertionError("cached and uncached generation gave different tokens")
    if "batch" in sections:
        print(f"\n# Throughput vs batch size ({n} new tokens per row)")
        print(throughput_vs_batch(setup.model, setup.prompt_ids, batches, n, repeats).to_string())
    if "precision" in sections:
        precisions = ("fp32", "bf16", "int8") + (("int8-dynamic",) if device.type == "cpu" else ())
        block = 128 if args.quick else 512
        print(
            f"\n# Precision: weights, speed ({n} new tokens), perplexity on "
            f"{setup.eval_ids.numel()} held-out Shakespeare tokens (block {block}, "
            f"stride {block // 2})"
        )
        table = compare_precisions(
            setup.model, setup.prompt_ids, setup.eval_ids, max_new_tokens=n,
            block_size=block, stride=block // 2, repeats=repeats, precisions=precisions,
        )  # fmt: skip
        print(table.to_string())


if __name__ == "__main__":
    main()
