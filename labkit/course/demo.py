"""``labkit demo``: a short tour of attention in which every printed claim is also checked.

It is the command-line twin of the first notebooks: build attention from its formula, compare
it with PyTorch, look at a causal mask, and decode with a KV cache. Each step prints what it
shows and a PASS/FAIL line, so the tour doubles as a smoke test of a fresh installation.
The tensors are random: rows and columns carry the words of a sentence only as labels (no
model reads them), so the printed weights show the mechanics, not what a trained model does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from labkit.device import get_device, seed_everything
from labkit.nn.attention import (
    KVCache,
    MultiHeadAttention,
    causal_mask,
    scaled_dot_product_attention,
)

WORDS = ["the", "cat", "sat", "down"]  # labels for 4 positions; the vectors are random


def _check(name: str, ok: bool, detail: str, failures: list[str]) -> None:
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    if not ok:
        failures.append(name)


def _print_matrix(weights: torch.Tensor, rows: list[str], cols: list[str]) -> None:
    print("        " + "".join(f"{c:>7}" for c in cols))
    for name, row in zip(rows, weights.tolist(), strict=True):
        print(f"  {name:>6}" + "".join(f"{w:7.2f}" for w in row))


def _step_attention(device: torch.device, failures: list[str]) -> None:
    print(
        "\n1. Scaled dot-product attention over 4 positions (d_k = 8). The queries, keys and"
        "\n   values are RANDOM vectors; the words only label the positions, so these weights"
        "\n   show the mechanics (rows sum to 1), not what a trained model would attend to."
    )
    q, k, v = (torch.randn(len(WORDS), 8, device=device) for _ in range(3))
    out, weights = scaled_dot_product_attention(q, k, v)
    _print_matrix(weights.cpu(), WORDS, WORDS)
    row_sums = weights.sum(-1)
    _check(
        "rows sum to 1",
        torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-6),
        f"max |sum - 1| = {(row_sums - 1).abs().max().item():.1e}",
        failures,
    )
    reference = nn.functional.scaled_dot_product_attention(q, k, v)
    diff = (out - reference).abs().max().item()
    _check(
        "equals torch.nn.functional.scaled_dot_product_attention",
        diff < 1e-5,
        f"max |difference| = {diff:.1e}",
        failures,
    )


def _step_causal(device: torch.device, failures: list[str]) -> None:
    print(
        "\n2. A causal mask: each position may look only at itself and earlier ones"
        " (random q, k, v again)"
    )
    mask = causal_mask(len(WORDS), device=device)
    _print_matrix(mask.float().cpu(), WORDS, WORDS)
    q, k, v = (torch.randn(len(WORDS), 8, device=device) for _ in range(3))
    _, weights = scaled_dot_product_attention(q, k, v, mask=mask)
    future = weights.masked_select(~mask)
    _check(
        "future positions get weight 0",
        bool((future == 0).all()),
        f"{future.numel()} masked entries, largest weight {future.abs().max().item():.1e}",
        failures,
    )


def _step_multi_head(device: torch.device, failures: list[str]) -> None:
    print("\n3. Multi-head attention with PyTorch's weights (d_model = 32, 4 heads)")
    torch_mha = nn.MultiheadAttention(32, 4, batch_first=True).to(device).eval()
    ours = MultiHeadAttention.from_torch(torch_mha).eval()
    x = torch.randn(2, 6, 32, device=device)
    expected, expected_weights = torch_mha(x, x, x)
    result = ours(x, need_weights=True)
    diff = (result.output - expected).abs().max().item()
    _check(
        "labkit MultiHeadAttention equals nn.MultiheadAttention",
        diff < 1e-5,
        f"max |difference| = {diff:.1e}",
        failures,
    )
    weight_diff = (result.weights.mean(dim=1) - expected_weights).abs().max().item()
    _check(
        "head-averaged weights agree",
        weight_diff < 1e-5,
        f"max |difference| = {weight_diff:.1e}",
        failures,
    )


def _step_kv_cache(device: torch.device, failures: list[str]) -> None:
    print("\n4. Decoding one token at a time with a KV cache (grouped-query: 4 heads, 2 KV heads)")
    mha = MultiHeadAttention(32, 4, n_kv_heads=2).to(device).eval()
    x = torch.randn(1, 10, 32, device=device)
    full = mha(x, is_causal=True).output
    cache = KVCache()
    steps = [mha(x[:, t : t + 1], is_causal=True, cache=cache).output for t in range(x.shape[1])]
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    _check(
        "incremental decoding equals the full causal pass",
        diff < 1e-5,
        f"max |difference| = {diff:.1e} over {x.shape[1]} steps",
        failures,
    )
    _check(
        "the cache stores only the KV heads",
        cache.k.shape[1] == 2,
        f"cache k shape {tuple(cache.k.shape)}: half the memory of caching all 4 heads",
        failures,
    )


STEPS: list[Callable[[torch.device, list[str]], None]] = [
    _step_attention,
    _step_causal,
    _step_multi_head,
    _step_kv_cache,
]


def run_demo(device: str = "auto", seed: int = 0) -> list[str]:
    """Run every step of the tour; return the names of the checks that failed."""
    torch_device = get_device(device)
    seed_everything(seed)
    print(f"labkit demo on {torch_device} (torch {torch.__version__}, seed {seed})")
    failures: list[str] = []
    with torch.no_grad():
        for step in STEPS:
            step(torch_device, failures)
    summary = f"{len(failures)} check(s) FAILED: {failures}" if failures else "All checks passed."
    print(f"\n{summary}")
    return failures
