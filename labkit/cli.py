"""The ``labkit`` command line: ``demo`` (a tour that checks itself), ``info``, and
``notebooks run`` (execute the course notebooks, full mode by default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from labkit import __version__


def _info(_: argparse.Namespace) -> int:
    import torch

    from labkit.device import get_device

    print(f"labkit {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"default device: {get_device('auto')}  (CUDA available: {torch.cuda.is_available()})")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from labkit.demo import run_demo

    failures = run_demo(device=args.device, seed=args.seed)
    return 1 if failures else 0


def _notebooks_run(args: argparse.Namespace) -> int:
    from labkit.notebooks import NotebookError, find_notebooks, run_notebook

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input: one clear line, not a traceback
        print(f"labkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
