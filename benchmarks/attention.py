"""Attention cost vs sequence length: full (math / fused SDPA), Linformer, Nystrom.

Prints one row per (variant, sequence length): the median forward time measured with
``torch.utils.benchmark`` and the size of the attention scores each variant computes
((T, T) for full attention, (T, k) for Linformer, three thin matrices for Nystrom; the fused
SDPA kernels compute the (T, T) scores in tiles without storing them whole). On CUDA it also
prints the measured peak memory of the forward pass.

    python benchmarks/attention.py                  # CPU, T = 128 .. 2048
    python benchmarks/attention.py --device cuda --max-len 8192
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from labkit.device import get_device
from labkit.nn import LinformerSelfAttention, MultiHeadAttention, NystromSelfAttention


def _variants(d_model: int, n_heads: int, seq_len: int, rank: int) -> dict[str, tuple]:
    """name -> (module, number of attention-score entries per head)."""
    landmarks = rank if seq_len % rank == 0 else seq_len
    return {
        "full (math)": (MultiHeadAttention(d_model, n_heads, backend="math"), seq_len * seq_len),
        "full (sdpa)": (MultiHeadAttention(d_model, n_heads, backend="sdpa"), seq_len * seq_len),
        f"linformer k={rank}": (
            LinformerSelfAttention(d_model, n_heads, seq_len, rank),
            seq_len * rank,
        ),
        f"nystrom m={landmarks}": (
            NystromSelfAttention(d_model, n_heads, landmarks),
            2 * seq_len * landmarks + landmarks**2,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64, help="Linformer k and Nystrom landmarks")
    args = parser.parse_args()

    device = get_device(args.device)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch={args.batch} d_model={args.d_model} heads={args.heads}"
    )
    print(f"{'variant':<18}{'T':>7}{'time (ms)':>12}{'attn scores (MB)':>18}{'peak CUDA (MB)':>16}")
    seq_len = args.min_len
    while seq_len <= args.max_len:
        x = torch.randn(args.batch, seq_len, args.d_model, device=device)
        for name, (module, entries) in _variants(
            args.d_model, args.heads, seq_len, args.rank
        ).items():
            module = module.to(device).eval()
            matrix_mb = args.batch * args.heads * entries * x.element_size() / 2**20
            with torch.no_grad():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timer = benchmark.Timer("module(x)", globals={"module": module, "x": x})
                ms = timer.blocked_autorange(min_run_time=0.5).median * 1e3
                peak = (
                    f"{torch.cuda.max_memory_allocated(device) / 2**20:16.1f}"
                    if device.type == "cuda"
                    else f"{'n/a':>16}"
                )
            print(f"{name:<18}{seq_len:>7}{ms:>12.2f}{matrix_mb:>18.2f}{peak}")
        seq_len *= 2


if __name__ == "__main__":
    main()
