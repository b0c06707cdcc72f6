"""The ``labkit`` command line: ``demo`` (a tour that checks itself), ``info``, ``grade``
(grade students' notebooks in a sandbox, see ``labkit.course.grade``),
``notebooks run`` (execute the course notebooks, full mode by default), ``book build`` (render
the course book, see ``labkit.course.book``), ``train char-gpt`` (nanoGPT's Shakespeare character
model, see ``labkit.course.chargpt``), ``train bpe-gpt`` (the same on BPE tokens, see
``labkit.course.bpegpt``), ``sample`` (text from either) and ``generate`` (text from a packaged
model through the fast decoding paths of ``labkit.inference.fast``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labkit import __version__

RUN_DIR = "out-shakespeare-char"  # nanoGPT's out_dir for this recipe
BPE_RUN_DIR = "out-shakespeare-bpe"
CHAR_GPT_DESCRIPTION = (
    "train nanoGPT's character-level Shakespeare GPT; the defaults are its CPU recipe "
    "(validation loss about 1.88 after 2000 steps on nanoGPT's tiny Shakespeare)"
)
BPE_GPT_DESCRIPTION = (
    "train a GPT on byte-level BPE tokens of the complete works of Shakespeare; the char-gpt "
    "recipe and flags, plus --vocab-size (the tokenizer is trained on the training split)"
)


def _info(_: argparse.Namespace) -> int:
    import torch

    from labkit.device import get_device

    print(f"labkit {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"default device: {get_device('auto')}  (CUDA available: {torch.cuda.is_available()})")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from labkit.course.demo import run_demo

    failures = run_demo(device=args.device, seed=args.seed)
    return 1 if failures else 0


def _notebooks_run(args: argparse.Namespace) -> int:
    from labkit.course.notebooks import NotebookError, find_notebooks, run_notebook

    mode = "smoke" if args.smoke else "full"
    notebooks = find_notebooks(args.dir, args.names)
    print(f"executing {len(notebooks)} notebook(s) in {mode} mode into {args.out}")
    failed = 0
    for path in notebooks:
        try:
            run = run_notebook(path, Path(args.out) / path.name, smoke=args.smoke)
        except NotebookError as err:
            failed += 1
            print(f"  FAILED {path.name}\n{err}", file=sys.stderr)
            continue
        print(f"  {path.name:<40} {run.seconds:7.1f} s")
    return 1 if failed else 0


def _notebooks_export(args: argparse.Namespace) -> int:
    from labkit.course.notebooks import export_html

    out = Path(args.out)
    for path in map(Path, args.notebooks):
        if not path.is_file():
            print(f"no notebook at {path}", file=sys.stderr)
            return 2
        print(export_html(path, out / f"{path.stem}.html"))
    return 0


def _book_build(args: argparse.Namespace) -> int:
    from labkit.course.book import BookBuildError, build_book

    try:
        build_book(args.root, smoke=args.smoke, force=args.force, jobs=args.jobs)
    except BookBuildError as err:
        print(f"labkit: book build failed\n{err}", file=sys.stderr)
        return 1
    return 0


def _book_readme(args: argparse.Namespace) -> int:
    from labkit.course.book import update_readme

    changed = update_readme(args.root)
    print("README.md: contents table " + ("updated" if changed else "already up to date"))
    return 0


def _exercises(args: argparse.Namespace) -> int:
    from labkit.course.exercises import write_starters

    for path in write_starters(args.dir, args.out):
        print(path)
    return 0


def _grade(args: argparse.Namespace) -> int:
    import ast

    from labkit.course.grade import Options, grade

    parameters = {}
    if args.smoke:
        parameters["SMOKE"] = True
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"-p takes NAME=VALUE (a Python literal), got {item!r}")
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    env = {}
    for name in args.env:
        if name in os.environ:
            env[name] = os.environ[name]
    options = Options(
        timeout_s=args.timeout,
        cell_timeout_s=args.cell_timeout,
        memory_mb=args.memory,
        file_mb=args.max_file,
        max_output_mb=args.max_output,
        parameters=parameters,
        data=[Path(p) for p in args.data],
        allow_read=[Path(p) for p in args.allow_read],
        env=env,
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.jobs),
        kernel=args.kernel,
        isolation=args.isolation,
    )
    results = grade(
        args.submissions,
        args.out,
        course_dir=args.course,
        options=options,
        jobs=args.jobs,
        exercise=args.exercise,
    )
    students = len({r.student for r in results})
    print(f"graded {len(results)} notebook(s) of {students} student(s): see {args.out}/summary.csv")
    return 0


class _NotGiven:
    """Marks the flags a command line did not give (argparse fills in only missing ones)."""

    def __repr__(self) -> str:
        return "not given"


NOT_GIVEN = _NotGiven()


def _recipe(name: str) -> type:
    """The settings class of ``labkit train NAME``."""
    from labkit.course.chargpt import recipes

    return next(r for r in recipes().values() if r.recipe == name)


def _train_recipe(args: argparse.Namespace) -> int:
    from dataclasses import fields as dataclass_fields
    from dataclasses import replace

    from labkit.course.chargpt import saved_settings, train
    from labkit.train.checkpoints import CheckpointWriteError
    from labkit.train.interrupts import TrainingInterrupted

    recipe = _recipe(args.train_command)
    parser = recipe_parser(recipe.recipe)
    fields = [field.name for field in dataclass_fields(recipe)]
    flags = parser.parse_args(args.flags)
    if flags.resume:  # the run's own settings, but for the flags given on this command line
        given = parser.parse_args(
            args.flags, namespace=argparse.Namespace(**dict.fromkeys(fields, NOT_GIVEN))
        )
        changed = {name: getattr(given, name) for name in fields}
        changed = {name: value for name, value in changed.items() if value is not NOT_GIVEN}
        settings = replace(saved_settings(flags.out, recipe), **changed)
    else:
        settings = recipe(**{name: getattr(flags, name) for name in fields})
    again = f"labkit train {recipe.recipe} --out {flags.out} --resume"
    try:
        train(settings, flags.out, resume=flags.resume, overwrite=flags.overwrite)
    except TrainingInterrupted as stop:
        saved = f"saved {stop.checkpoint}" if stop.checkpoint else "no checkpoint was saved"
        print(
            f"labkit: {stop.signal_name}: stopped after step {stop.step}; {saved}\n"
            f"resume with: {again}",
            file=sys.stderr,
        )
        return stop.exit_code
    except CheckpointWriteError as error:
        print(f"labkit: error: {error}; then resume with: {again}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: stopped at once, mid-step
        print(
            f"\nlabkit: interrupted at once; resume from the last checkpoint with: {again}",
            file=sys.stderr,
        )
        return 130
    return 0


def _sample(args: argparse.Namespace) -> int:
    from labkit.course.chargpt import load_run, sample_text

    model, tokenizer, _ = load_run(args.out, args.device)
    text = sample_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(text)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from labkit.inference import run_generate

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    result = run_generate(
        args.prompt,
        model=args.model,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        precision=args.precision,
        compile=args.compile,
        speculative=args.speculative,
        draft_precision=args.draft_precision,
        device=args.device,
        threads=args.threads,
        activations=args.activations,
        on_text=show if args.stream else None,
    )
    print(result.text if not args.stream else "", flush=True)
    if result.compile_seconds:
        print(f"compile warm-up: {result.compile_seconds:.1f} s (not timed)", file=sys.stderr)
    if result.speculative is not None:
        spec = result.speculative
        drafts = f", {spec.draft_passes} draft passes" if spec.draft_passes else ""
        print(
            f"{args.speculative}: {spec.accepted} of {spec.proposed} draft tokens accepted "
            f"(acceptance {spec.acceptance_rate:.0%}), {spec.forward_passes} forward "
            f"passes{drafts}",
            file=sys.stderr,
        )
    print(result.summary(), file=sys.stderr)
    return 0


def _add_generate_parser(commands: Any) -> None:
    """``labkit generate``: its flags mirror ``labkit.inference.run_generate``'s arguments."""
    generate = commands.add_parser(
        "generate",
        help="generate text with a packaged model, fast (static cache, compile, int8/int4)",
        description="Generate text with a packaged model. The text goes to stdout; the last "
        "line on stderr is 'N tokens in S s (X tokens/s)'.",
    )
    add = generate.add_argument
    add("--model", default="smollm2-135m-instruct", choices=("smollm2-135m-instruct",),
        help="packaged model (default: %(default)s)")  # fmt: skip
    add("--prompt", required=True, help="text to continue, or the question with --chat")
    add("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add("--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    how = generate.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    how.add_argument("--temperature", type=float, help="sample at this temperature")
    add("--top-p", type=float, help="nucleus sampling threshold (with --temperature)")
    add("--precision", choices=("fp32", "bf16", "int8", "int4"), default="fp32",
        help="weights: float32, bfloat16, or int8/int4 weight-only (default: fp32)")  # fmt: skip
    add("--activations", choices=("auto", "fp32", "bf16"), default="auto",
        help="int8/int4 activations: auto (default) = bf16 where the CPU/GPU has bf16 "
        "units (detected at run time; PyTorch's int8/int4 CPU kernels are fast in bf16), "
        "else fp32")  # fmt: skip
    add("--compile", action="store_true", help="torch.compile the decoding step (warm-up first)")
    add("--speculative", choices=("none", "prompt-lookup", "draft-model"), default="none",
        help="draft tokens by prompt lookup or with a cheaper copy of the model, then check "
        "them: greedy decoding's exact tokens (default: none)")  # fmt: skip
    add("--draft-precision", choices=("int4", "int8", "bf16"), default="int4",
        help="the draft's weights with --speculative draft-model (default: int4)")  # fmt: skip
    add("--device", default="auto", help="auto (default), cpu or cuda")
    add("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    add("--stream", action="store_true", help="print the text while it is generated")
    generate.set_defaults(run=_generate)


def recipe_parser(name: str = "char-gpt") -> argparse.ArgumentParser:
    """The flags of ``labkit train NAME`` (char-gpt or bpe-gpt), with its settings' defaults
    (nanoGPT's CPU recipe). Built only when that command runs: it imports torch, which the
    others need not."""
    from labkit.course.chargpt import PRECISIONS

    recipe = _recipe(name)
    d = recipe()
    bpe = name == "bpe-gpt"
    description = BPE_GPT_DESCRIPTION if bpe else CHAR_GPT_DESCRIPTION
    parser = argparse.ArgumentParser(prog=f"labkit train {name}", description=description)
    dflt = " (default: %(default)s)"
    add = parser.add_argument
    works = "complete works of Shakespeare" if bpe else "tiny Shakespeare"
    add("--text", help=f"UTF-8 text file (default: labkit's {works})")
    add("--out", default=BPE_RUN_DIR if bpe else RUN_DIR, help="run directory to write" + dflt)
    add(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint, with its own settings "
        "(flags given here must not change the result)",
    )
    add("--overwrite", action="store_true", help="start afresh in an --out that holds a run")

    def setting(group: Callable[..., Any], name: str, text: str, **more: Any) -> None:
        """``--name`` for the settings field ``name``, with the field's type and default."""
        default = getattr(d, name)
        flag = "--" + name.replace("_", "-")
        group(flag, type=type(default), default=default, help=text + dflt, **more)

    if bpe:
        setting(parser.add_argument_group("tokenizer").add_argument, "vocab_size", "BPE vocabulary")
    model = parser.add_argument_group("model").add_argument
    setting(model, "n_layer", "transformer blocks")
    setting(model, "n_head", "attention heads")
    setting(model, "n_embd", "model width")
    setting(model, "block_size", "context, tokens" if bpe else "context, characters")
    setting(model, "dropout", "dropout rate")
    opt = parser.add_argument_group("optimisation").add_argument
    setting(opt, "batch_size", "windows per step")
    setting(opt, "max_iters", "optimizer steps")
    setting(opt, "lr", "peak learning rate")
    setting(opt, "min_lr", "end of the cosine decay")
    setting(opt, "warmup_iters", "warm-up steps, <= max-iters")
    setting(opt, "weight_decay", "AdamW's decay")
    setting(opt, "beta2", "AdamW's second beta")
    setting(opt, "grad_clip", "max gradient norm")
    run = parser.add_argument_group("evaluation and run").add_argument
    setting(run, "eval_interval", "steps between evaluations")
    setting(run, "eval_iters", "batches per estimate")
    setting(run, "seed", "init, data order, eval windows")
    setting(run, "device", "auto, cpu, cuda or mps")
    run("--dtype", choices=PRECISIONS, help="(default: fp32 on the CPU, else auto)")
    run("--compile", action="store_true", help="train through torch.compile")
    run("--no-progress", dest="progress", action="store_false", help="no progress bar")
    save = parser.add_argument_group("checkpoints (in --out/checkpoints)").add_argument
    save(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="steps between checkpoints (default: every evaluation)",
    )
    setting(save, "keep", "newest checkpoints kept, besides the best by validation loss",
            metavar="K")  # fmt: skip
    save(
        "--on-checkpoint-error",
        choices=("stop", "continue"),
        default=d.on_checkpoint_error,
        help="when a checkpoint cannot be written (disk full)" + dflt,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Transformer Lab's toolkit.")
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print versions and the device labkit will use")
    info.set_defaults(run=_info)

    demo = commands.add_parser(
        "demo", help="a two-minute tour of labkit's attention, each claim checked"
    )
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    notebooks = commands.add_parser("notebooks", help="execute the course notebooks")
    notebook_commands = notebooks.add_subparsers(dest="notebook_command", required=True)
    run = notebook_commands.add_parser(
        "run", help="execute notebooks with papermill and keep the executed copies"
    )
    speed = run.add_mutually_exclusive_group()
    speed.add_argument("--full", dest="smoke", action="store_false", help="full mode (default)")
    speed.add_argument("--smoke", dest="smoke", action="store_true", help="smoke mode (fast)")
    run.add_argument("--dir", default="notebooks", help="folder of NN_topic.ipynb notebooks")
    run.add_argument("--out", default="build/notebooks", help="folder for executed copies")
    run.add_argument("names", nargs="*", help="notebooks to run, e.g. 01 or 02_multi_head")
    run.set_defaults(run=_notebooks_run, smoke=False)
    export = notebook_commands.add_parser(
        "export",
        help="save executed notebooks as HTML files whose plotly figures draw (plotly.js inlined "
        "once per file, no CDN)",
    )
    export.add_argument("notebooks", nargs="+", help="executed notebooks (.ipynb)")
    export.add_argument("--out", default="build/html", help="folder for the HTML files")
    export.set_defaults(run=_notebooks_export)

    book = commands.add_parser("book", help="build the course book (Jupyter Book)")
    book_commands = book.add_subparsers(dest="book_command", required=True)
    build = book_commands.add_parser(
        "build",
        help="execute the notebooks (reusing fresh executed copies) and render book/_build/html",
    )
    mode = build.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="smoke", action="store_false", help="full mode (default)")
    mode.add_argument("--smoke", dest="smoke", action="store_true", help="smoke mode (fast)")
    build.add_argument(
        "--force", action="store_true", help="execute every notebook, even with a fresh copy"
    )
    build.add_argument(
        "--jobs", type=int, default=1, help="notebooks executed at once (default: 1)"
    )
    build.add_argument("--root", default=".", help="the repository root (default: .)")
    build.set_defaults(run=_book_build, smoke=False)
    readme = book_commands.add_parser(
        "readme", help="rewrite README.md's table of contents from the notebooks' titles"
    )
    readme.add_argument("--root", default=".", help="the repository root (default: .)")
    readme.set_defaults(run=_book_readme)

    exercises = commands.add_parser(
        "exercises",
        help="write every notebook's exercises without their solutions (starters): the lessons "
        "and exercises/",
    )
    exercises.add_argument("--out", required=True, help="folder for the starter notebooks")
    exercises.add_argument(
        "--dir",
        default="notebooks",
        help="the course folder, or a folder of exercise notebooks (default: %(default)s)",
    )
    exercises.set_defaults(run=_exercises)

    grade = commands.add_parser(
        "grade",
        help="grade students' exercise notebooks, each in a sandbox (see labkit.course.grade)",
        description="Grade submitted notebooks against the course's copies: check cells are "
        "restored from the course, each notebook runs in its own sandbox (time, memory, CPU "
        "and file-size limits, a fresh working directory, no network, no secrets, a read-only "
        "view of this machine), and DIR gets grades.csv, summary.csv, feedback/<student>.md, "
        "the executed notebooks and report.md.",
    )
    grade.add_argument(
        "submissions",
        nargs="+",
        metavar="SUBMISSION",
        help="a student's notebook, or a folder or zip of them (student id: the folder's or "
        "zip's name, else the file name without the exercise's name)",
    )
    grade.add_argument("--out", required=True, metavar="DIR", help="folder for the grades")
    grade.add_argument(
        "--course", default="notebooks", help="course notebooks (default: %(default)s)"
    )
    grade.add_argument("--exercise", help="the exercise every unnamed notebook answers")
    grade.add_argument(
        "--timeout", type=float, default=600, help="seconds per notebook (default: %(default)s)"
    )
    grade.add_argument("--cell-timeout", type=int, help="seconds per cell (default: --timeout)")
    grade.add_argument(
        "--memory", type=int, default=4096, help="MB per notebook (default: %(default)s)"
    )
    grade.add_argument(
        "--max-file", type=int, default=64, help="MB per written file (default: %(default)s)"
    )
    grade.add_argument(
        "--max-output",
        type=float,
        default=1.0,
        help="MB of output kept per cell (default: %(default)s)",
    )
    grade.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (default: 1)")
    grade.add_argument(
        "--threads", type=int, help="torch/BLAS threads per notebook (default: cores / jobs)"
    )
    grade.add_argument("--smoke", action="store_true", help="run the notebooks with SMOKE = True")
    grade.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a parameter of the notebooks (papermill), e.g. -p SEED=1",
    )
    grade.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="file or folder copied into every working directory",
    )
    grade.add_argument(
        "--allow-read",
        action="append",
        default=[],
        metavar="PATH",
        help="a path submissions may read (read-only) besides Python and labkit",
    )
    grade.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable on (all others but a safe few are not)",
    )
    grade.add_argument("--kernel", default="python3", help="Jupyter kernel (default: %(default)s)")
    grade.add_argument(
        "--isolation",
        choices=("bwrap", "unshare", "none"),
        default="bwrap",
        help="the strongest sandbox to try; weaker ones are used where it fails, with a warning "
        "(default: %(default)s)",
    )
    grade.set_defaults(run=_grade)

    train = commands.add_parser("train", help="train a model from the command line")
    train_commands = train.add_subparsers(dest="train_command", required=True)
    for name, description in (("char-gpt", CHAR_GPT_DESCRIPTION), ("bpe-gpt", BPE_GPT_DESCRIPTION)):
        recipe = train_commands.add_parser(  # its flags: recipe_parser
            name, add_help=False, help=description.split(";")[0]
        )
        recipe.set_defaults(run=_train_recipe, takes_flags=True)

    sample = commands.add_parser(
        "sample", help="generate text from a `train char-gpt` or `train bpe-gpt` run"
    )
    sample.add_argument("--out", default=RUN_DIR, help=f"run directory (default: {RUN_DIR})")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument(
        "--max-new-tokens", type=int, default=500, help="tokens to add (characters for char-gpt)"
    )
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=200, help="sample from the k most likely")
    sample.add_argument("--seed", type=int, default=1337)
    sample.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    sample.set_defaults(run=_sample)

    _add_generate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # extra: flags of a command that parses its own
    if extra and not getattr(args, "takes_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.flags = extra
    try:
        return args.run(args)
    except ValueError as err:  # bad input or a damaged file: one clear line, not a traceback
        message = " ".join(str(err).split())  # one line, whatever the error held
        print(f"labkit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
