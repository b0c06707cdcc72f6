"""Model parallelism with PyTorch's own engine: tensor parallelism (DTensor) and FSDP.

Symbols: W = world size (processes), B = batch, T = positions, D = d_model, F = d_ff,
H = attention heads (H_kv key/value heads), P = the model's parameter count.

Data parallelism (``labkit.train.distributed``, DDP) keeps a full copy of the model on every
rank and splits the batch. When the model itself no longer fits one device there are two
more ways to divide the work, both built on ``torch.distributed`` and used here as PyTorch
ships them:

* **Tensor parallelism (TP)** splits the *matrices* of one layer. The MLP ``down(act(up(x)))``
  is split column-wise in ``up`` (rank r holds F/W of the hidden units, so it computes its
  slice of ``act(up(x))`` without talking to anyone: the activation acts per unit) and
  row-wise in ``down`` (rank r multiplies its F/W slice by the matching F/W rows of ``down``,
  a partial sum of the output); one all-reduce adds the W partial sums. Attention is split the
  same way by heads: each rank owns H/W heads (its columns of the query/key/value projections,
  whole heads, so softmax needs nothing from other ranks) and its rows of the output
  projection, again one all-reduce per layer. Every rank sees the whole batch; each holds
  1/W of the layer's weights and does 1/W of its multiply-adds. The communication sits inside
  every layer, which is why TP is used between GPUs of one machine.
* **Fully sharded data parallelism (FSDP)** is data parallelism whose copies are not full:
  each rank *stores* 1/W of every parameter, gradient and optimizer state (about 1/W of DDP's
  per-rank memory for these), all-gathers a layer's full weights just before the layer
  runs (forward and again for backward) and frees them afterwards, and reduce-scatters the
  gradients so each rank receives the average of just its own shard. Compute per rank is
  DDP's; memory for weights and optimizer state is divided by W.

The helpers here are thin: ``torch.distributed.tensor.parallel.parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel`` does TP, ``torch.distributed.fsdp.fully_shard``
(FSDP2) does FSDP. They run on gloo (CPU) and NCCL (CUDA) alike; a sharded parameter is a
``DTensor`` whose ``to_local()`` is this rank's piece and ``full_tensor()`` the whole.
Under ``torchrun``::

    info = init_distributed(device)
    mesh = device_mesh(info, device)                  # a 1-D mesh of the W ranks
    tensor_parallel_mlp(layer.ffn, mesh)              # in place: up col-wise, down row-wise
    tensor_parallel_attention(layer.self_attn, mesh)  # in place: H/W heads per rank
    fully_shard_model(gpt, mesh)                      # in place: FSDP per layer + root
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from labkit.nn.attention import MultiHeadAttention
from labkit.nn.layers import FeedForward
from labkit.train.distributed import DistributedInfo


def device_mesh(info: DistributedInfo, device: torch.device | str) -> DeviceMesh:
    """A 1-D ``DeviceMesh`` of all W ranks on ``device``'s type (``"cpu"``/gloo or
    ``"cuda"``/nccl); needs the process group of :func:`init_distributed` with W > 1."""
    if not info.enabled:
        raise ValueError(
            "a device mesh needs several processes, but this is a world of one; launch with "
            "torchrun and call init_distributed() first"
        )
    return init_device_mesh(torch.device(device).type, (info.world_size,))


def _check_divisible(what: str, size: int, mesh: DeviceMesh) -> None:
    world = mesh.size()
    if size % world != 0:
        raise ValueError(f"{what}={size} must be divisible by the {world} ranks of the mesh")


def tensor_parallel_mlp(mlp: FeedForward, mesh: DeviceMesh) -> FeedForward:
    """Split a ``FeedForward`` across the mesh in place: ``up_proj`` (and ``gate_proj``)
    column-wise, ``down_proj`` row-wise; returns it.

    Input (..., D) the same on every rank; rank r computes the hidden units
    [r F/W, (r+1) F/W), i.e. (..., F/W), and the output (..., D) is the all-reduced sum of
    the W partial products (bias added once), equal on every rank.
    """
    if not isinstance(mlp, FeedForward):
        raise ValueError(f"mlp must be a labkit FeedForward, got {type(mlp).__name__}")
    _check_divisible("d_ff", mlp.up_proj.out_features, mesh)
    plan = {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
    if mlp.gate_proj is not None:  # swiglu: the gate is split exactly like up_proj
        plan["gate_proj"] = ColwiseParallel()
    return parallelize_module(mlp, mesh, plan)


def tensor_parallel_attention(attn: MultiHeadAttention, mesh: DeviceMesh) -> MultiHeadAttention:
    """Split a ``MultiHeadAttention`` across the mesh by heads, in place; returns it.

    ``q_proj``/``k_proj``/``v_proj`` are split column-wise, so rank r computes heads
    [r H/W, (r+1) H/W) (and key/value heads [r H_kv/W, (r+1) H_kv/W), which are exactly the
    ones those query heads share under GQA): (B, H/W, T, d_k) per rank. ``out_proj`` is split
    row-wise, and its all-reduce returns the full (B, T, D) output on every rank. The module's
    ``n_heads``/``n_kv_heads`` become the per-rank counts. A mask must broadcast over heads
    (head dimension 1); a KV cache holds this rank's heads only.
    """
    if not isinstance(attn, MultiHeadAttention):
        raise ValueError(f"attn must be a labkit MultiHeadAttention, got {type(attn).__name__}")
    _check_divisible("n_heads", attn.n_heads, mesh)
    _check_divisible("n_kv_heads", attn.n_kv_heads, mesh)
    plan = {
        "q_proj": ColwiseParallel(),
        "k_proj": ColwiseParallel(),
        "v_proj": ColwiseParallel(),
        "out_proj": RowwiseParallel(),
    }
    parallelize_module(attn, mesh, plan)
    attn.n_heads //= mesh.size()
    attn.n_kv_heads //= mesh.size()
    return attn


def fully_shard_model(
    model: nn.Module, mesh: DeviceMesh, blocks: Iterable[nn.Module] | None = None
) -> nn.Module:
    """FSDP2 in place: shard each of ``blocks`` (default ``model.layers``), then the rest.

    Each block is one unit whose parameters are all-gathered together just before it runs and
    freed after it, so at most about one block's full weights exist at a time; the root unit
    holds what is left (embeddings, final norm, head). Every parameter becomes a ``DTensor``
    sharded along dim 0 (1/W per rank). Build the optimizer *after* this call, on
    ``model.parameters()``, so its state is sharded too. Gradients are averaged over ranks,
    as with DDP: feed each rank its own B/W examples.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if blocks is None:
        if not isinstance(getattr(model, "layers", None), nn.ModuleList):
            raise ValueError(
                f"{type(model).__name__} has no .layers ModuleList; pass blocks= explicitly"
            )
        blocks = model.layers
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole (unsharded) state dict on every rank, on the CPU; every rank must call it
    (a sharded entry is all-gathered)."""
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for name, value in model.state_dict().items()
    }


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank stores: its shards under TP/FSDP, everything otherwise
    (a tied parameter counts once)."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors this rank stores (sharded like their parameters)."""
    return sum(
        _local(p.grad).numel() * p.grad.element_size()
        for p in model.parameters()
        if p.grad is not None
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (e.g. Adam's two moments) this rank stores, its shards only."""
    return sum(
        _local(value).numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor) and value.dim() > 0  # the step counter is a scalar
    )
