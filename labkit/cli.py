"""The ``labkit`` command line: ``labkit demo`` (a tour that checks itself) and ``labkit info``."""

from __future__ import annotations

import argparse
import sys

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
