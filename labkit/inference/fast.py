"""Fast decoding: a decoder prepared once (precision, static KV cache, compiled step), then used
with ``labkit.generation``'s strategies unchanged.

The ideas are those of PyTorch's gpt-fast, on labkit's own models:

1. **Precision** (``convert``): ``"fp32"``, ``"bf16"``, or weight-only ``"int8"`` / ``"int4"``
   matrices multiplied by PyTorch's fused kernels (``labkit.inference.quant``). Decoding
   reads every weight once per token, so fewer bytes per weight means more tokens per second.
   int8 / int4 compute with bfloat16 activations where the hardware has bf16 units
   (``activation_dtype``, detected at run time; the CPU kernels are several times slower with
   float32 activations), else float32; ``dtype=`` chooses.
2. **A static KV cache** (``labkit.nn.cache.StaticCache``): allocated once for prompt + new
   tokens (rounded up to ``cache_block`` columns so later calls reuse it), written in place.
3. **A compiled decoding step** (``compile=True``): ``torch.compile`` (inductor) of "one token
   in, logits out" over the static cache, with ``fullgraph=True`` and ``dynamic=False``: every
   step has the same shapes, so it compiles once per cache size and never again (the tests
   check ``torch._dynamo``'s counters). On CUDA it uses ``mode="reduce-overhead"``: CUDA
   graphs replay the whole step as one launch. A speculative check (1 + k tokens) is padded
   to 1 + ``draft_tokens`` columns, so it is one more compiled graph whatever k is. The
   prompt (prefill) runs eagerly.

``FastLM(model, ...)`` is itself a model (``config``, ``new_cache``, ``forward``), so
``labkit.generation.generate(fast, ids, static_cache=True, ...)`` works with greedy decoding,
sampling, batches, stop strings, streaming and speculative decoding, by prompt lookup
(``speculative="prompt-lookup"``) or by a draft model (``speculative="draft-model"``,
``draft_model=fast.draft("int4")``: an int4 copy drafts, the model checks, and the tokens
stay the model's greedy ones); ``fast.generate(...)`` / ``fast.stream(...)`` pass
``static_cache=True`` for you. Beam search works too (the cache reorders in place), eagerly.

``load_fast`` and ``run_generate`` are the Python side of ``labkit generate`` (same options).

Example::

    fast = FastLM(load("smollm2-135m-instruct").model, precision="int8", compile=True)
    fast.warm_up(max_len=256)                       # compile now, not inside the first call
    out = fast.generate("Once upon a time", tokenizer, max_new_tokens=64)

Shapes: B batch, T new tokens, L static cache length, V vocabulary.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from labkit import generation
from labkit.device import bf16_hardware, get_device, model_device
from labkit.inference.measure import to_bf16
from labkit.inference.quant import quantize
from labkit.models.base import CausalLMOutput, last_positions
from labkit.nn.cache import StaticCache

PRECISIONS = ("fp32", "bf16", "int8", "int4")
PACKAGED_MODELS = ("smollm2-135m-instruct",)


ACTIVATIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def activation_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The activations' dtype ``convert`` picks for ``precision`` on ``device`` by default.

    fp32 / bf16: their own dtype. int8 / int4 (weight-only): bfloat16 where
    ``labkit.device.bf16_hardware(device)`` finds bf16 units (detected at run time), else
    float32. PyTorch's fused CPU kernels for int8/int4 weights are fast with bfloat16
    activations and several times slower with float32 ones (benchmarks/README.md).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or bf16_hardware(device).units:
        return torch.bfloat16
    return torch.float32


def convert(
    model: nn.Module,
    precision: str,
    *,
    group_size: int = 32,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A copy of ``model`` (eval mode) in ``precision``; the original is unchanged.

    ``"fp32"`` / ``"bf16"``: every float tensor in that dtype. ``"int8"`` / ``"int4"``:
    ``quantize`` (int4 in groups of ``group_size``, CPU only), activations (and norms,
    biases, scales) in ``dtype``: float32 or bfloat16; None picks ``activation_dtype``
    (bfloat16 where the hardware has bf16 units).
    """
    wanted = activation_dtype(precision, model_device(model))
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"dtype (the activations') must be torch.float32 or torch.bfloat16, got {dtype}"
        )
    if dtype is not None and precision in ("fp32", "bf16") and dtype != wanted:
        raise ValueError(
            f"precision={precision!r} computes in {wanted}; dtype={dtype} chooses the "
            "activations of int8 / int4 only"
        )
    if precision == "fp32":
        return copy.deepcopy(model).float().eval()
    if precision == "bf16":
        return to_bf16(model)
    return quantize(model, precision, group_size=group_size).to(dtype or wanted)


def _cache_and_input_guards(model: nn.Module, guards: list[Any]) -> list[bool]:
    """Which of dynamo's guards the compiled step of ``model`` checks before each call:
    those on the input ids and the static cache's tensors (shape, stride, dtype, device: a
    new cache size compiles a new graph) and the global state (grad mode, ...).

    The thousands of guards on the model's modules, parameters and buffers are dropped:
    each call would check them all (about 1 ms of a 12 ms int4 step of SmolLM2 on a 2-core
    CPU, benchmarks/README.md) to detect changes that never happen, since ``FastLM``'s model
    is its own converted copy and the compiled step is this instance's only
    (``isolate_recompiles``). The weights stay inputs of the graph, read at each call.
    """
    weights = {id(t) for t in (*model.parameters(), *model.buffers())}
    return [
        not guard.name or (guard.guard_type == "TENSOR_MATCH" and id(guard.value) not in weights)
        for guard in guards
    ]


class FastLM(nn.Module):
    """A decoder-only model prepared for fast decoding (see the module docstring).

    model: a labkit ``GPT`` or ``Llama`` (any device; int4 needs the CPU).
    precision / group_size / dtype: as in ``convert`` (dtype None: int8 / int4 activations in
        bfloat16 where the hardware has bf16 units, ``activation_dtype``).
    compile: compile the single-token step (inductor; CUDA graphs on CUDA).
    cache_block: the static cache's length is prompt + new tokens rounded up to this, so
        generations of similar length share one cache and one compiled step.
    draft_tokens: the longest speculative draft the compiled check takes (generation's
        ``draft_tokens`` should not exceed it; longer checks run eagerly).
    backend: ``torch.compile``'s backend: ``"inductor"`` generates fused kernels;
        ``"eager"`` only traces (graph capture and guards without code generation, which is
        how the tests check recompilation quickly).

    Submodule ``model`` is the converted copy; the compiled step does not watch it for
    changes (``_cache_and_input_guards``), so change it only before the first call.
    ``forward`` runs it, through the compiled step for one new token per row on the cache
    ``new_cache`` made; the compiled step treats that token as real (not padding), as
    generation's tokens after the prompt always are.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        precision: str = "fp32",
        compile: bool = False,
        group_size: int = 32,
        dtype: torch.dtype | None = None,
        cache_block: int = 256,
        backend: str = "inductor",
        draft_tokens: int = 8,
    ) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", True) or not hasattr(model, "new_cache"):
            raise ValueError(
                f"FastLM takes a decoder-only labkit model (GPT, Llama), got {type(model).__name__}"
            )
        if cache_block < 1:
            raise ValueError(f"cache_block must be >= 1, got {cache_block}")
        # the dtype the step computes in (int8 / int4: chosen by activation_dtype if None)
        self.activations = dtype or activation_dtype(precision, model_device(model))
        self.model = convert(model, precision, group_size=group_size, dtype=dtype)
        self.precision = precision
        self.cache_block = cache_block
        self.draft_tokens = draft_tokens
        self._cache: StaticCache | None = None
        self._cuda_graphs = compile and model_device(self.model).type == "cuda"
        self._step = None
        self.eval()  # for inference only; the compiled graph is specialised on eval mode
        if compile:
            mode = "reduce-overhead" if self._cuda_graphs and backend == "inductor" else None
            self._step = torch.compile(
                self._decode,
                fullgraph=True,
                dynamic=False,
                mode=mode,
                backend=backend,
                options={"guard_filter_fn": partial(_cache_and_input_guards, self.model)},
                isolate_recompiles=True,  # this instance's graphs, not another FastLM's
            )

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def compiled(self) -> bool:
        return self._step is not None

    def new_cache(
        self, batch: int | None = None, max_len: int | None = None, *, dtype: Any = None
    ) -> StaticCache:
        """The static cache for ``batch`` rows and at least ``max_len`` positions, emptied.

        The same cache is handed out again while ``batch`` and the rounded length stay the
        same (its tensors keep their addresses: no recompilation, valid CUDA graphs).
        """
        if batch is None or max_len is None:
            raise ValueError(
                "FastLM decodes with a static cache: use fast.generate(...) / fast.stream(...)"
                " or labkit.generation.generate(fast, ..., static_cache=True)"
            )
        length = min(-(-max_len // self.cache_block) * self.cache_block, self.config.max_len)
        if max_len > length:
            raise ValueError(f"max_len={max_len} exceeds the model's max_len={length}")
        cache = self._cache
        if cache is None or (cache.batch, cache.max_len) != (batch, length):
            cache = self._cache = self.model.new_cache(batch=batch, max_len=length, dtype=dtype)
        else:
            cache.reset()
        return cache

    def _decode(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, W) ids -> logits (B, W, V) and hidden (B, W, D) on the static cache: the
        compiled step (W = 1 for decoding, 1 + ``draft_tokens`` for a speculative check)."""
        out = self.model(input_ids, cache=self._cache)
        return out.logits, out.hidden

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """The wrapped model's forward, through the compiled step for T <= 1 + draft_tokens
        real new tokens per row on this model's static cache after the prompt.

        T = 1 is a decoding step. 1 < T <= 1 + ``draft_tokens`` (a speculative check) is
        padded to 1 + ``draft_tokens`` columns with copies of the last token, so one compiled
        graph serves every draft length; the padding's logits are dropped and its cache
        columns forgotten (``truncate``), so the result is that of the T tokens alone.
        """
        seq = input_ids.shape[1]
        fast = (
            self._step is not None
            and cache is not None
            and cache is self._cache
            and seq <= 1 + self.draft_tokens
            and not kwargs
            and (attention_mask is None or bool(attention_mask[:, -seq:].all()))
            and cache.seq_len > 0
        )
        if not fast:
            return self.model(
                input_ids,
                attention_mask=attention_mask,
                cache=cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        past = cache.seq_len
        width = 1 if seq == 1 else 1 + self.draft_tokens
        # a fresh contiguous (B, width): a column sliced from the growing sequence has a stride
        # that changes every step, and the compiled graph is specialised on strides
        ids = input_ids[:, -1:].repeat(1, width)
        ids[:, :seq] = input_ids
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits, hidden = self._step(ids)
        logits, hidden = logits[:, :seq], hidden[:, :seq]
        if self._cuda_graphs:  # the graph's outputs are overwritten by its next replay
            logits, hidden = logits.clone(), hidden.clone()
        if width > seq:
            cache.truncate(past + seq)
        return CausalLMOutput(last_positions(logits, logits_to_keep), hidden, None, None)

    def warm_up(self, batch: int = 1, max_len: int = 256, speculative: bool = False) -> float:
        """Compile the step for this cache size now (a few dummy steps), and with
        ``speculative`` the check of 1 + ``draft_tokens`` tokens too; returns seconds."""
        start = time.perf_counter()
        with torch.inference_mode():
            cache = self.new_cache(batch=batch, max_len=max_len)
            ids = torch.zeros(batch, 1, dtype=torch.long, device=model_device(self.model))
            for _ in range(4 if self._cuda_graphs else 3):  # prefill, then compiled steps
                self(ids, cache=cache)
            if speculative and cache.max_len >= 4 + self.draft_tokens:
                for _ in range(3 if self._cuda_graphs else 1):
                    self(ids.repeat(1, 1 + self.draft_tokens), cache=cache)
                    cache.truncate(3)
            cache.reset()
        return time.perf_counter() - start

    def draft(self, precision: str = "int4", **options: Any) -> FastLM:
        """A cheaper copy of this model to draft for it (``speculative="draft-model"``):
        ``precision`` (int8 / int4 / bf16) weights, compiled if this model is; ``options``
        as in ``FastLM`` (e.g. ``backend``)."""
        if precision == "fp32":
            raise ValueError(
                "a draft must be cheaper than the model it drafts for: precision int4, int8 "
                "or bf16, not fp32"
            )
        options = {"compile": self.compiled} | options
        return FastLM(self.model, precision=precision, **options)

    def generate(
        self,
        prompts: Tensor | str | Sequence[str] | Sequence[int],
        tokenizer: Any = None,
        attention_mask: Tensor | None = None,
        **options: Any,
    ) -> generation.GenerationOutput:
        """``labkit.generation.generate`` on this model with its static cache."""
        return generation.generate(
            self, prompts, attention_mask, tokenizer=tokenizer, static_cache=True, **options
        )

    def stream(
        self, prompt: Tensor | str | Sequence[int], tokenizer: Any, **options: Any
    ) -> generation.TextStream:
        """``labkit.generation.stream`` on this model with its static cache."""
        return generation.stream(self, prompt, tokenizer, static_cache=True, **options)


# ----------------------------------------------------------------------------------------------
# The packaged models, as `labkit generate` runs them
# ----------------------------------------------------------------------------------------------


def load_fast(
    name: str = "smollm2-135m-instruct",
    *,
    precision: str = "fp32",
    compile: bool = False,
    device: str = "auto",
    threads: int | None = None,
    group_size: int = 32,
    activations: str = "auto",
) -> tuple[FastLM, Any]:
    """A packaged model (``PACKAGED_MODELS``) as a ``FastLM`` on ``device``, and its tokenizer.

    threads: ``torch.set_num_threads`` for the CPU (None leaves PyTorch's choice).
    activations: the int8 / int4 activations' dtype, one of ``ACTIVATIONS``: ``"auto"``
    (bfloat16 where the hardware has bf16 units, see ``activation_dtype``), ``"fp32"`` or
    ``"bf16"``.
    """
    from labkit.models.pretrained import load

    if name not in PACKAGED_MODELS:
        raise ValueError(f"model must be one of {PACKAGED_MODELS}, got {name!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {tuple(ACTIVATIONS)}, got {activations!r}")
    if activations != "auto" and precision not in ("int8", "int4"):
        raise ValueError(
            f"activations={activations!r} applies to int8 / int4 weights; precision "
            f"{precision!r} computes in its own dtype"
        )
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    target = get_device(device)
    if precision == "int4" and target.type != "cpu":
        raise ValueError(
            f"--precision int4 runs on the CPU only (PyTorch's int4 CPU kernel); the device is "
            f"{target}: use --device cpu, or int8 / bf16 on {target.type}"
        )
    pretrained = load(name)
    fast = FastLM(
        pretrained.model.to(target),
        precision=precision,
        compile=compile,
        group_size=group_size,
        dtype=ACTIVATIONS[activations],
    )
    return fast, pretrained.tokenizer


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as one user turn of the tokenizer's chat template, ready for the answer."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class RunResult:
    """One ``run_generate``: the text, how many tokens were generated in how many seconds
    (prefill + decoding, after any compile warm-up), the warm-up's seconds and, with
    speculative decoding, its ``SpeculativeStats``."""

    text: str
    new_tokens: int
    seconds: float
    compile_seconds: float
    speculative: generation.SpeculativeStats | None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def summary(self) -> str:
        """``N tokens in S s (X tokens/s)``, the last line ``labkit generate`` prints."""
        speed = f"{self.tokens_per_s:.1f} tokens/s"
        return f"{self.new_tokens} tokens in {self.seconds:.2f} s ({speed})"


def run_generate(
    prompt: str,
    *,
    model: str | FastLM = "smollm2-135m-instruct",
    tokenizer: Any = None,
    chat: bool = False,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_p: float | None = None,
    precision: str = "fp32",
    compile: bool = False,
    speculative: str = "none",
    draft_precision: str = "int4",
    device: str = "auto",
    threads: int | None = None,
    activations: str = "auto",
    on_text: Callable[[str], Any] | None = None,
) -> RunResult:
    """``labkit generate`` as a function: the same options, the text and the timing back.

    model: a packaged model's name (loaded with ``load_fast``), or a ready ``FastLM`` with its
    ``tokenizer`` (then precision, compile, device, threads and activations are its own;
    ``activations`` is as in ``load_fast``). Greedy unless
    ``temperature`` (and optionally ``top_p``) is given. ``on_text`` receives each piece of
    text as it is generated (``--stream``). ``speculative``: one of
    ``labkit.generation.SPECULATIVE``; with ``"draft-model"`` a ``draft_precision`` copy of
    the model drafts (``FastLM.draft``).
    """
    if isinstance(model, FastLM):
        if tokenizer is None:
            raise ValueError("a FastLM model needs its tokenizer (tokenizer=...)")
        fast = model
    else:
        fast, tokenizer = load_fast(
            model,
            precision=precision,
            compile=compile,
            device=device,
            threads=threads,
            activations=activations,
        )
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, speculative=speculative, draft_tokens=fast.draft_tokens
    )
    draft = None
    if speculative == "draft-model":
        if fast.precision not in ("fp32", "bf16"):
            raise ValueError(
                f"speculative='draft-model' drafts with a cheaper copy of an fp32 or bf16 "
                f"model; precision {fast.precision!r} is already quantized: use "
                "speculative='none' or 'prompt-lookup'"
            )
        if draft_precision == "int4" and model_device(fast.model).type != "cpu":
            raise ValueError(
                "--draft-precision int4 runs on the CPU only (PyTorch's int4 CPU kernel): "
                "use --draft-precision int8 on the GPU"
            )
        draft = options["draft_model"] = fast.draft(draft_precision)
    if temperature is not None:
        options |= dict(do_sample=True, temperature=temperature, top_p=top_p)
    elif top_p is not None:
        raise ValueError("top_p samples: give a temperature too (greedy decoding has no top_p)")
    n_prompt = len(tokenizer.encode(text, add_special_tokens=False))
    compile_seconds = 0.0
    if fast.compiled:
        length = n_prompt + max_new_tokens - 1
        compile_seconds = fast.warm_up(1, length, speculative=speculative != "none")
        if draft is not None:  # the draft reads one token more (``generation._DraftModel``)
            compile_seconds += draft.warm_up(1, length + 1)
    start = time.perf_counter()
    pieces, shown = fast.stream(text, tokenizer, **options), []
    for piece in pieces:
        shown.append(piece)
        if on_text is not None:
            on_text(piece)
    seconds = time.perf_counter() - start
    return RunResult(
        "".join(shown), len(pieces.new_tokens), seconds, compile_seconds, pieces.speculative
    )


__all__ = [
    "ACTIVATIONS",
    "PACKAGED_MODELS",
    "PRECISIONS",
    "FastLM",
    "RunResult",
    "activation_dtype",
    "chat_prompt",
    "convert",
    "load_fast",
    "run_generate",
]
