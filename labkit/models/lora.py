"""LoRA (Hu et al. 2021): low-rank adapters on a frozen model, computed as ``peft`` does.

A frozen linear layer ``y = x W^T + b`` (W is (out, in)) gets a trainable low-rank update::

    y = base_layer(x) + (dropout(x) @ lora_A^T @ lora_B^T) * alpha / r
        lora_A: (r, in), kaiming-uniform like nn.Linear (peft's default init)
        lora_B: (out, r), zeros, so the adapted model starts equal to the base model

Only ``r * (in + out)`` numbers per layer are trained instead of ``in * out``. After training
the update can be folded into the weight (``merge_lora``: ``W += lora_B @ lora_A * alpha / r``),
so inference costs nothing extra, and taken out again (``unmerge_lora``).

* ``apply_lora(model, r, alpha, target_modules)`` wraps every ``nn.Linear`` whose name matches
  (as ``peft``'s ``target_modules``: a list of name suffixes such as ``["q_proj", "v_proj"]``,
  or one string, a regular expression the full name must match) and freezes everything else.
* ``lora_state_dict`` / ``save_adapter`` / ``load_adapter``: the adapter weights alone, as a
  safetensors file whose metadata holds r, alpha, dropout and the targets.
* ``trainable_parameters(model)``: trainable, total and percent (``print`` it for peft's line).
* ``merged(model)``: a plain copy with every adapter folded in; ``save_merged_llama`` writes a
  labkit ``Llama`` so that ``transformers.LlamaForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update, scaled by ``alpha / r``.

    Args:
        base_layer: the linear layer to adapt; it is kept (frozen) as ``self.base_layer``.
        r: the rank, at least 1.
        alpha: the scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input only (the base path sees the plain input).

    Input (..., in) -> output (..., out), like the base layer.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if r < 1:
            raise ValueError(f"rank r must be at least 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.r, self.alpha = int(r), float(alpha)
        self.scale = self.alpha / self.r
        w = base_layer.weight
        self.lora_A = nn.Parameter(
            torch.empty(r, base_layer.in_features, dtype=w.dtype, device=w.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base_layer.out_features, r, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(
            self.lora_A, a=math.sqrt(5)
        )  # peft's default (init_lora_weights=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> Tensor:
        """The update ``lora_B @ lora_A * alpha / r``, (out, in), same shape as the weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out): base output plus the scaled low-rank path (unless merged)."""
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; the forward then skips the adapter path."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (equal up to float rounding)."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex the full name must match; a list holds name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's ``nn.Linear`` layers, e.g. ``q_proj``."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name
        }
    )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every ``LoRALinear`` in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    target_modules: str | Sequence[str],
    dropout: float = 0.0,
) -> nn.Module:
    """Wrap the matching linear layers in ``LoRALinear`` (in place) and freeze everything else.

    ``target_modules`` selects by name as ``peft.LoraConfig(target_modules=...)`` does: a list
    of suffixes (``["q_proj", "v_proj"]`` matches ``layers.0.self_attn.q_proj`` ...), or one
    string, a regex that must match the full module name. Returns the model.

    Raises ValueError if nothing matches (naming the model's linear layers), if a match is not
    an ``nn.Linear``, or if its weight is shared with another module (a tied LM head: merging
    would change the embedding too).
    """
    if isinstance(target_modules, Sequence) and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty: name at least one module, e.g. ['q_proj']")
    targets = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    adapted = [n for n, m in targets if isinstance(m, LoRALinear)]
    if adapted:
        raise ValueError(f"{adapted} already have LoRA adapters (apply_lora was called before)")
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matches no module of {type(model).__name__}; "
            f"its linear layers are named {linear_names(model)}"
        )
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"LoRA adapts nn.Linear layers only; {name!r} is a {type(module).__name__} "
                f"(linear layers: {linear_names(model)})"
            )
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name, module in targets:
        if counts[id(module.weight)] > 1:
            raise ValueError(
                f"{name!r} shares its weight with another module (tied weights); merging an "
                "adapter into it would change both: leave it out of target_modules"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, r, alpha, dropout).train(module.training)  # keep eval mode
        setattr(parent, child, layer)
    model._lora_config = {  # what save_adapter writes into the file's metadata
        "r": int(r),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "target_modules": target_modules,
    }
    return model


def _require_lora(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call apply_lora first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); returns the model."""
    for _, layer in _require_lora(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again (in place); returns the model."""
    for _, layer in _require_lora(model):
        layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights only: ``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}``."""
    return {
        f"{name}.{part}": getattr(layer, part).detach()
        for name, layer in _require_lora(model)
        for part in ("lora_A", "lora_B")
    }


@dataclass(frozen=True)
class ParameterReport:
    """Trainable and total parameter counts (shared weights counted once), like peft's report."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # peft's print_trainable_parameters line
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """How many parameters train (``requires_grad``) out of all; ``print`` it for one line."""
    params = list(model.parameters())  # shared (tied) parameters appear once
    return ParameterReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter weights and their config (r, alpha, dropout, targets) to safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    config = getattr(model, "_lora_config", None)
    if config is None:
        layer = next(iter(lora_layers(model)))[1]
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)})
        dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
        config = {"r": layer.r, "alpha": layer.alpha, "dropout": dropout, "target_modules": names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"lora_config": json.dumps(config)})
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(adapter tensors, config) from a file written by ``save_adapter``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "lora_config" not in metadata:
            raise ValueError(f"{path} is not a labkit LoRA adapter (no 'lora_config' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    return tensors, json.loads(metadata["lora_config"])


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into ``model`` (in place) and return it.

    A model without LoRA layers first gets them from the file's config (``apply_lora``); one
    that has them must have exactly the file's adapter names and shapes. ValueError otherwise,
    or if the adapters are merged (unmerge first).
    """
    tensors, config = read_adapter(path)
    if not any(True for _ in lora_layers(model)):
        apply_lora(model, config["r"], config["alpha"], config["target_modules"], config["dropout"])
    layers = dict(lora_layers(model))
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's adapters are merged: unmerge_lora(model) before loading")
    ours = {
        f"{n}.{part}": getattr(layer, part)
        for n, layer in layers.items()
        for part in ("lora_A", "lora_B")
    }
    missing, unexpected = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or unexpected:
        raise ValueError(
            f"adapter {path} does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    with torch.no_grad():
        for name, param in ours.items():
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"adapter {name} is {tuple(tensors[name].shape)} in {path}, "
                    f"{tuple(param.shape)} in the model"
                )
            param.copy_(tensors[name])
    return model


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter folded in and each ``LoRALinear`` replaced by its
    plain ``nn.Linear`` (trainable again); ``model`` itself is left unchanged."""
    _require_lora(model)
    out = copy.deepcopy(model)
    for name, layer in list(lora_layers(out)):
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, layer.base_layer)
    out.__dict__.pop("_lora_config", None)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def save_merged_llama(model: nn.Module, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Save a labkit ``Llama`` with its adapters merged as a Hugging Face folder.

    ``transformers.LlamaForCausalLM.from_pretrained(folder)`` then loads it (config.json and
    model.safetensors; ``tokenizer``, if given, is saved alongside). The weight names come
    from ``labkit.models.llama.hf_name_map`` through ``Llama.to_hf``.
    """
    from labkit.models.llama import Llama

    plain = merged(model) if any(True for _ in lora_layers(model)) else model
    if not isinstance(plain, Llama):
        raise TypeError(f"save_merged_llama saves a labkit Llama, got {type(model).__name__}")
    folder = Path(folder)
    plain.to_hf().save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
