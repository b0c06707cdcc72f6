"""Prompt chaining: a task split into prompts run in order, each reading earlier outputs.

A chain is a list of ``ChainStep``s. Step ``i``'s prompt is filled from the inputs and the
outputs of steps ``0 .. i-1`` (by name), e.g. decompose -> answer -> verify:

    steps = [
        ChainStep("plan", "Question: {question}\\nSteps:", 40),
        ChainStep("work", "Question: {question}\\nSteps: {plan}\\nWork:", 60),
        ChainStep("check", "... {work} ... Verdict:", 30),
    ]
    run_chain(complete, steps, [{"question": q} for q in questions])

The model is any ``complete(prompts, max_new_tokens, stop) -> texts`` (batched: every item of
the batch runs step ``i`` together), so a chain runs ``len(steps)`` batched generations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Complete = Callable[[list[str], int, tuple[str, ...]], list[str]]


@dataclass(frozen=True)
class ChainStep:
    """One prompt of a chain.

    Args:
        name: the key its (stripped) output is stored under, for later steps to use.
        template: a ``str.format`` template over the inputs and earlier outputs, or a function
            of that mapping returning the prompt (e.g. to apply a chat template).
        max_new_tokens: the most tokens this step may generate.
        stop: strings that end the step's generation (kept out of the stored output).
    """

    name: str
    template: str | Callable[[Mapping[str, str]], str]
    max_new_tokens: int
    stop: tuple[str, ...] = ()

    def prompt(self, values: Mapping[str, str]) -> str:
        if callable(self.template):
            return self.template(values)
        try:
            return self.template.format(**values)
        except KeyError as err:
            raise ValueError(
                f"chain step {self.name!r} uses {{{err.args[0]}}} but only "
                f"{sorted(values)} are known at this step: name an input or an earlier step"
            ) from None


def _strip_stop(text: str, stop: tuple[str, ...]) -> str:
    for s in stop:
        if s and text.endswith(s):
            return text[: -len(s)].strip()
    return text.strip()


def run_chain(
    complete: Complete, steps: Sequence[ChainStep], inputs: Sequence[Mapping[str, str]]
) -> list[dict[str, str]]:
    """Run ``steps`` in order for every item of ``inputs``; return each item's values.

    Returns:
        one dict per input: the input's fields plus one entry per step (its output, stripped
        of a final stop string and surrounding whitespace), plus ``"<name>_prompt"`` with the
        prompt that step was given, so a chain can be read back.
    """
    names = [s.name for s in steps]
    if not steps or len(set(names)) != len(names):
        raise ValueError(f"a chain needs at least one step with distinct names, got {names}")
    values = [dict(x) for x in inputs]
    for step in steps:
        clash = [x for x in values if step.name in x]
        if clash:
            raise ValueError(f"step name {step.name!r} is already an input field")
        prompts = [step.prompt(x) for x in values]
        outputs = complete(prompts, step.max_new_tokens, step.stop)
        if len(outputs) != len(prompts):
            raise ValueError(f"complete returned {len(outputs)} texts for {len(prompts)} prompts")
        for x, prompt, out in zip(values, prompts, outputs, strict=True):
            x[step.name] = _strip_stop(out, step.stop)
            x[f"{step.name}_prompt"] = prompt
    return values
