"""One training step of nanoGPT's CPU char model: labkit's variants vs nanoGPT's ``model.py``.

The step is forward, cross-entropy, backward, gradient clipping to 1.0 and AdamW (betas 0.9,
0.99, weight decay 0.1 on the matrices), on random batches of 12 x 64 characters of a
65-character vocabulary, with the recipe's model (4 layers, 4 heads, 128 wide, no biases,
exact GELU). Each variant runs ``--steps`` steps per round, the variants alternate for
``--rounds`` rounds, and the table gives the median milliseconds of CPU time per step
(``time.process_time``), so a machine shared with other jobs distorts it little. One thread
unless ``--threads``. nanoGPT's ``model.py`` comes from a checkout (``--nanogpt DIR``, not
part of this project).

Variants: ``nanoGPT`` (its model, torch's AdamW as its ``configure_optimizers`` makes it on
the CPU), ``labkit`` (``GPT`` + ``make_optimizer``: fused ``F.layer_norm``, fused AdamW),
``labkit-written-ln`` (``LayerNorm`` as the seven elementwise operations of its formula, what
labkit ran before), ``labkit-foreach-adamw`` (the unfused AdamW), ``labkit-bf16`` (autocast),
``labkit-compile`` (``torch.compile`` of the model; its compile time is printed apart).

    python benchmarks/train_step.py --nanogpt /tmp/nanoGPT
    python benchmarks/train_step.py --nanogpt /tmp/nanoGPT --variants nanoGPT labkit
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from labkit.models.gpt import GPT, GPTConfig
from labkit.nn import layers
from labkit.train import TrainConfig, make_optimizer

VARIANTS = (
    "nanoGPT",
    "labkit",
    "labkit-written-ln",
    "labkit-foreach-adamw",
    "labkit-bf16",
    "labkit-compile",
)
B, T, V = 12, 64, 65


def written_layer_norm(self: layers.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm's formula as separate operations (labkit's forward before the fused kernel)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    h = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
    return h + self.bias if self.bias is not None else h


def make_step(variant: str, nanogpt: Path, x: Tensor, y: Tensor) -> Callable[[], float]:
    torch.manual_seed(0)
    amp = variant == "labkit-bf16"
    if variant == "nanoGPT":
        sys.path.insert(0, str(nanogpt))
        from model import GPT as NanoGPT
        from model import GPTConfig as NanoConfig

        model = NanoGPT(NanoConfig(n_layer=4, n_head=4, n_embd=128, block_size=T, bias=False,
                                   vocab_size=V, dropout=0.0))  # fmt: skip
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

        def loss_of() -> Tensor:
            return model(x, y)[1]
    else:
        model = GPT(GPTConfig.preset("nanogpt-char-cpu", vocab_size=V))
        config = TrainConfig(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), device="cpu")
        optimizer = make_optimizer(model, config)
        if variant == "labkit-foreach-adamw":
            optimizer = torch.optim.AdamW(optimizer.param_groups, betas=(0.9, 0.99), fused=False)
        run = torch.compile(model) if variant == "labkit-compile" else model

        def loss_of() -> Tensor:
            return F.cross_entropy(run(x).logits.flatten(0, 1), y.flatten())

    original = layers.LayerNorm.forward

    def step() -> float:
        if variant == "labkit-written-ln":
            layers.LayerNorm.forward = written_layer_norm
        try:
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                loss = loss_of()
            loss.backward()
        finally:
            layers.LayerNorm.forward = original
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if "nanoGPT" in args.variants and not (args.nanogpt / "model.py").is_file():
        sys.exit(f"error: {str(args.nanogpt)!r} holds no nanoGPT model.py")
    torch.set_num_threads(args.threads)
    x, y = torch.randint(V, (B, T)), torch.randint(V, (B, T))
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    steps = {}
    for variant in args.variants:
        steps[variant] = make_step(variant, args.nanogpt, x, y)
        start = time.perf_counter()
        steps[variant]()  # compiles the compiled variant
        print(f"{variant}: first step {time.perf_counter() - start:.1f} s (wall)")
    times: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(args.rounds):
        for variant, step in steps.items() if r % 2 == 0 else reversed(steps.items()):
            start = time.process_time()
            for _ in range(args.steps):
                step()
            times[variant].append((time.process_time() - start) / args.steps * 1000)
    base = statistics.median(times["nanoGPT"]) if "nanoGPT" in times else None
    print(f"\nload average now {os.getloadavg()[0]:.1f}")
    print(f"{'variant':24}{'CPU ms/step':>12}{'vs nanoGPT':>12}")
    for variant, values in times.items():
        ms = statistics.median(values)
        print(f"{variant:24}{ms:>12.2f}" + (f"{base / ms:>11.2f}x" if base else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
