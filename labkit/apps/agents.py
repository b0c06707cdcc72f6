"""A tool-using agent loop: the model writes actions, our code runs the tools.

The protocol is plain text, so any completion model can follow it (few-shot examples teach it):

    Question: How much do 6 apples cost?
    Action: price(apple)
    Observation: 2
    Action: calculator(6 * 2)
    Observation: 12
    Answer: 12

Each **step** is one generation that stops at ``Observation:``. If the model wrote an
``Action: name(argument)`` first, the loop runs that tool and writes its result (or the error)
after ``Observation:``; if it wrote ``Answer:`` first, the turn ends. A malformed action (no
parentheses, an unknown tool, neither action nor answer) is not a crash: a message saying what
was wrong and what to write instead goes back to the model as the observation.

- ``calculate``: a safe calculator (``+ - * /`` and parentheses over numbers, parsed with ``ast``,
  never ``eval``);
- ``Tool``: a name, a one-line description for the prompt, and a function of one string;
- ``parse_action``: the tool call in a step's text, or a ``ToolCallError`` with the message the
  model gets back;
- ``Agent``: the loop, with a **step budget** (``max_steps`` generations per question) and a
  **memory** of the conversation's earlier questions and answers, written into every prompt;
  ``ask`` returns an ``AgentResult`` (answer, steps, why it stopped, transcript).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Complete = Callable[[list[str], int, tuple[str, ...]], list[str]]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}  # fmt: skip


def calculate(expression: str) -> float | int:
    """The value of ``expression``: numbers, ``+ - * /``, unary minus and parentheses only.

    Parsed with ``ast`` and evaluated node by node: no names, calls, attributes or ``**``, so
    model-written text cannot run code. Raises ``ValueError`` for anything else (and
    ``ZeroDivisionError`` for a division by zero).
    """
    if len(expression) > 80:
        raise ValueError(f"expression longer than 80 characters: {expression[:40]!r}...")

    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not allowed in a calculator expression: {type(node).__name__}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an expression: {expression!r}") from err
    return value(tree)


def show_number(value: float | int) -> str:
    """``12.0`` -> ``"12"``, ``2.5`` -> ``"2.5"``: how observations print numbers."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@dataclass(frozen=True)
class Tool:
    """A function the model may call: ``Action: <name>(<argument>)``.

    Args:
        name: a lower-case identifier (what the model writes).
        description: one line for the prompt's tool list.
        fn: the argument string -> the result (a number or text). A ``ValueError``,
            ``LookupError`` or ``ArithmeticError`` it raises becomes an error observation.
    """

    name: str
    description: str
    fn: Callable[[str], object]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", self.name):
            raise ValueError(f"a tool name must be a lower-case identifier, got {self.name!r}")


class ToolCallError(ValueError):
    """A step's text is not a valid tool call; the message is written for the model to read."""


_ACTION = re.compile(r"Action:[ \t]*(.*)")
_ANSWER = re.compile(r"Answer:[ \t]*(.*)")
_CALL = re.compile(r"([A-Za-z_]\w*)\((.*)\)")


def parse_action(text: str, tools: Sequence[Tool]) -> tuple[str, str]:
    """``(tool name, argument)`` of the first ``Action:`` line of ``text``.

    Raises:
        ToolCallError: no ``Action:`` line, no ``name(argument)`` after it, or an unknown name;
            its message names the problem, the tools and the expected format.
    """
    names = [t.name for t in tools]
    usage = f"write 'Action: <tool>(<argument>)' with a tool from {names}, or 'Answer: <answer>'"
    found = _ACTION.search(text)
    if not found:
        raise ToolCallError(f"no action or answer found: {usage}")
    written = found.group(1).strip()
    call = _CALL.fullmatch(written)
    if not call:
        raise ToolCallError(f"malformed action {written!r}: {usage}")
    name, argument = call.group(1), call.group(2).strip()
    if name not in names:
        raise ToolCallError(f"unknown tool {name!r}: {usage}")
    return name, argument


@dataclass
class AgentStep:
    """One generation of the loop: what the model wrote and, for a call, what came back."""

    output: str  # the model's text, up to (not including) "Observation:"
    tool: str | None = None
    argument: str | None = None
    observation: str | None = None  # the tool's result, or an "error: ..." message


@dataclass
class AgentResult:
    """One question's run: ``stopped`` is ``"answer"`` or ``"budget"`` (no answer in time)."""

    question: str
    answer: str | None
    stopped: str
    steps: list[AgentStep] = field(default_factory=list)

    @property
    def transcript(self) -> str:
        lines = [f"Question: {self.question}"]
        for step in self.steps:
            lines.append(step.output)
            if step.observation is not None:
                lines.append(f"Observation: {step.observation}")
        return "\n".join(lines)


class Agent:
    """A tool-using loop with a step budget and a memory of the conversation.

    The prompt of every step is: ``instructions``, the tool list, ``examples`` (few-shot
    transcripts in the protocol above), the memory (this conversation's earlier questions and
    their answers), then the current question and the steps so far.

    Args:
        complete: ``complete(prompts, max_new_tokens, stop) -> texts`` (called with one prompt).
        tools: the tools the model may call (distinct names).
        instructions: the text that opens every prompt.
        examples: solved transcripts, each ending with an ``Answer:`` line.
        max_steps: the step budget: at most this many generations per question.
        max_new_tokens: the most tokens of one step.
        first_step_prefix: text the loop writes at the start of each question's first step
            (``"Action:"`` makes a small model call a tool before it may answer); it counts as
            part of the model's output.
    """

    STOP = ("Observation:",)

    def __init__(
        self,
        complete: Complete,
        tools: Sequence[Tool],
        instructions: str = "",
        examples: str = "",
        max_steps: int = 4,
        max_new_tokens: int = 32,
        first_step_prefix: str = "",
    ) -> None:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be distinct, got {names}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.complete, self.tools = complete, {t.name: t for t in tools}
        self.instructions, self.examples = instructions, examples
        self.max_steps, self.max_new_tokens = max_steps, max_new_tokens
        self.first_step_prefix = first_step_prefix
        self.memory: list[tuple[str, str | None]] = []  # (question, answer) of earlier turns

    def reset(self) -> None:
        """Forget the conversation (a new user)."""
        self.memory.clear()

    def prompt(self, question: str, steps: Sequence[AgentStep]) -> str:
        tool_list = "\n".join(f"- {t.name}: {t.description}" for t in self.tools.values())
        parts = [self.instructions, f"Tools:\n{tool_list}\n", self.examples]
        if self.memory:
            earlier = "".join(
                f"Question: {q}\nAnswer: {a if a is not None else '(no answer)'}\n"
                for q, a in self.memory
            )
            parts.append(f"Conversation so far:\n{earlier}")
        scratch = "".join(
            f"{s.output}\n" + (f"Observation: {s.observation}\n" if s.observation else "")
            for s in steps
        )
        parts.append(f"Question: {question}\n{scratch}")
        return "\n".join(p for p in parts if p)

    def _run_tool(self, name: str, argument: str) -> str:
        try:
            result = self.tools[name].fn(argument)
        except (ValueError, LookupError, ArithmeticError) as err:
            return f"error: {name}({argument}) failed: {err}"
        return show_number(result) if isinstance(result, int | float) else str(result)

    def ask(self, question: str) -> AgentResult:
        """Run the loop on ``question`` until an answer or the step budget; remember the turn."""
        result = AgentResult(question, answer=None, stopped="budget")
        for index in range(self.max_steps):
            prefix = self.first_step_prefix if index == 0 else ""
            prompt = self.prompt(question, result.steps) + prefix
            text = prefix + self.complete([prompt], self.max_new_tokens, self.STOP)[0]
            text = text.split("Observation:")[0].rstrip()
            action, answer = _ACTION.search(text), _ANSWER.search(text)
            if answer and (not action or answer.start() < action.start()):
                result.steps.append(AgentStep(text[: answer.end()]))
                result.answer, result.stopped = answer.group(1).strip(), "answer"
                break
            step = AgentStep(text[: action.end()] if action else text)  # drop what follows
            try:
                step.tool, step.argument = parse_action(text, list(self.tools.values()))
            except ToolCallError as err:
                step.observation = f"error: {err}"
            else:
                step.observation = self._run_tool(step.tool, step.argument)
            result.steps.append(step)
        self.memory.append((question, result.answer))
        return result
