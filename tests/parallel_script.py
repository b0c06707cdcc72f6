"""Tensor parallelism and FSDP on W processes, checked against one process; one launch runs all.

    torchrun --standalone --nproc_per_node 2 tests/parallel_script.py OUT [--device cuda]

Every rank builds the same full modules from the same seed, so it can compute the
single-process reference itself and compare its sharded run with it:

* ``mlp`` / ``swiglu`` / ``attention``: a labkit ``FeedForward`` (GELU and SwiGLU) and a
  grouped-query ``MultiHeadAttention`` split with :mod:`labkit.train.parallel`; the largest
  differences of the output, the input's gradient and the full (all-gathered) weight
  gradients from the unsplit module's.
* ``fsdp``: a tiny GPT trained for STEPS AdamW steps under FSDP2, each rank on its own half
  of every batch, against the plain model trained on whole batches: the largest difference of
  the final weights and the two loss histories.
* ``memory``: bytes of parameters, gradients and Adam state this rank holds after one step
  under FSDP and under DDP.

Each rank saves these numbers to ``OUT/rank{r}.pt``; tests/test_distributed.py asserts on
them. float64 throughout, so a correct split agrees to ~1e-12.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.models import GPT, GPTConfig
from labkit.nn import FeedForward, MultiHeadAttention
from labkit.train import (
    all_reduce_mean,
    cleanup,
    init_distributed,
    local_device,
    wrap_model,
)
from labkit.train.distributed import SINGLE_PROCESS, DistributedInfo
from labkit.train.parallel import (
    device_mesh,
    full_state_dict,
    fully_shard_model,
    gradient_bytes,
    optimizer_state_bytes,
    parameter_bytes,
    tensor_parallel_attention,
    tensor_parallel_mlp,
)

# Shapes: B sequences of T positions, D model width, F hidden units, H (H_KV) heads, V vocab.
B, T, D, F_HIDDEN, H, H_KV, V = 4, 6, 16, 32, 4, 2, 48
STEPS, LR, SEED = 3, 1e-2, 0


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.detach().cpu() - b.detach().cpu()).abs().max().item()


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare_split(make: Callable, split: Callable, mesh, device: torch.device, **call) -> dict:
    """Forward and backward of ``split(make())`` vs ``make()`` on the same input: largest
    differences of output, input gradient and each weight gradient (all-gathered)."""
    torch.manual_seed(SEED)
    reference = make().to(device, torch.float64)
    sharded = split(copy.deepcopy(reference), mesh)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ref, x_tp = x.to(device).requires_grad_(), x.to(device).requires_grad_()
    out_ref, out_tp = reference(x_ref, **call), sharded(x_tp, **call)
    out_ref, out_tp = (getattr(o, "output", o) for o in (out_ref, out_tp))  # attention: a tuple
    weights = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (out_ref * weights.to(device)).sum().backward()  # a loss whose gradient is not all ones
    (out_tp * weights.to(device)).sum().backward()
    grads = {
        name: _max_diff(_full(p.grad), dict(reference.named_parameters())[name].grad)
        for name, p in sharded.named_parameters()
    }
    shards = {name: tuple(p.to_local().shape) for name, p in sharded.named_parameters()
              if hasattr(p, "to_local")}  # fmt: skip
    return {
        "output": _max_diff(out_tp, out_ref),
        "input_grad": _max_diff(x_tp.grad, x_ref.grad),
        "weight_grads": grads,
        "shards": shards,
    }


def tiny_gpt(device: torch.device) -> GPT:
    torch.manual_seed(SEED)
    config = GPTConfig(
        vocab_size=V, d_model=D, n_heads=H, n_layers=2, max_len=T, d_ff=F_HIDDEN, dropout=0.0,
        bos_id=0, eos_id=0, pad_id=0,
    )  # fmt: skip
    return GPT(config).to(device, torch.float64)


def batches(device: torch.device) -> Tensor:
    """(STEPS, B, T + 1) token ids, the same on every rank."""
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (STEPS, B, T + 1), generator=generator).to(device)


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1]).logits  # (b, T, V)
    return F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))


def train(
    model: nn.Module, data: Tensor, rows: slice, info: DistributedInfo
) -> tuple[list[float], torch.optim.Optimizer]:
    """STEPS AdamW steps on ``data[:, rows]``; the logged loss is the mean over ranks."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for tokens in data:
        loss = lm_loss(model, tokens[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients: their bytes are measured
        losses.append(all_reduce_mean(loss, info))
    return losses, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    info = init_distributed(args.device)
    device = local_device(args.device, info)
    mesh = device_mesh(info, args.device)
    results: dict = {"world_size": info.world_size}

    results["mlp"] = compare_split(
        lambda: FeedForward(D, F_HIDDEN, "gelu"), tensor_parallel_mlp, mesh, device
    )
    results["swiglu"] = compare_split(
        lambda: FeedForward(D, F_HIDDEN, "swiglu", bias=False), tensor_parallel_mlp, mesh, device
    )
    results["attention"] = compare_split(
        lambda: MultiHeadAttention(D, H, n_kv_heads=H_KV), tensor_parallel_attention, mesh,
        device, is_causal=True,
    )  # fmt: skip

    data = batches(device)
    per_rank = B // info.world_size
    own_rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    single = tiny_gpt(device)
    single_losses, single_opt = train(single, data, slice(None), SINGLE_PROCESS)
    fsdp = fully_shard_model(tiny_gpt(device), mesh)
    fsdp_losses, fsdp_opt = train(fsdp, data, own_rows, info)
    final = full_state_dict(fsdp)
    results["fsdp"] = {
        "losses": fsdp_losses,
        "single_losses": single_losses,
        "weights": {name: _max_diff(w, single.state_dict()[name]) for name, w in final.items()},
        "moved": _max_diff(single.state_dict()["lm_head.weight"],
                           tiny_gpt(device).state_dict()["lm_head.weight"]),
    }  # fmt: skip

    ddp = wrap_model(tiny_gpt(device), info, device)
    _, ddp_opt = train(ddp, data[:1], own_rows, info)
    results["memory"] = {
        name: {
            "parameters": parameter_bytes(model),
            "gradients": gradient_bytes(model),
            "optimizer": optimizer_state_bytes(optimizer),
        }
        for name, model, optimizer in [
            ("single", single, single_opt), ("fsdp", fsdp, fsdp_opt), ("ddp", ddp, ddp_opt)
        ]
    }  # fmt: skip
    torch.save(results, args.out / f"rank{info.rank}.pt")
    cleanup(info)


if __name__ == "__main__":
    main()
