"""Mutation testing of labkit's core with mutmut: do the tests catch plausible bugs?

mutmut rewrites one function at a time (``<`` for ``<=``, ``+ 1`` for ``- 1``, a dropped
argument, ``None`` for a value, ...) and runs the tests that call that function; a mutant that no
test fails on has *survived*. Each module below is mutated alone, against its own test files only,
in a scratch copy of the repository under ``build/mutation/<module>/`` (the checkout is never
touched), and the per-module score is printed as a Markdown table.

    python benchmarks/mutation.py                      # every module (an hour or more on 2 cores)
    python benchmarks/mutation.py schedules norms      # some modules
    python benchmarks/mutation.py attention --survivors    # also list each surviving mutant's diff
    python benchmarks/mutation.py norms --recheck NAME...  # current tests against named mutants
    python benchmarks/mutation.py llama --recheck NAME... -k "not smollm2"  # some tests only

It is not part of ``python -m pytest`` (the default CI run): it is slow and its figure is a
measurement, not a pass/fail check. Results and the surviving mutants judged equivalent are in
``tests/README.md``. Needs the dev extras (``pip install -e ".[dev]"``, which bring mutmut).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """One module to mutate and the tests that own it."""

    source: str  # path of the module, relative to the repository root
    tests: tuple[str, ...]  # its own test files
    functions: tuple[str, ...] = ()  # mutate only these functions (mutmut name globs); all if empty
    pytest_args: tuple[str, ...] = field(default=())  # e.g. ("-k", "schedule")


ATTENTION_TESTS = (
    "tests/test_attention.py",
    "tests/test_masks.py",
    "tests/test_rotary_attention.py",
)

TARGETS: dict[str, Target] = {
    "attention": Target("labkit/nn/attention.py", ATTENTION_TESTS),
    "masks": Target("labkit/nn/masks.py", ATTENTION_TESTS),
    "efficient": Target("labkit/nn/efficient.py", ("tests/test_attention.py",)),
    "cache": Target("labkit/nn/cache.py", ATTENTION_TESTS),
    "positional": Target(
        "labkit/nn/positional.py", ("tests/test_positional.py", "tests/test_rotary_attention.py")
    ),
    "norms": Target(
        "labkit/nn/layers.py",
        ("tests/test_layers.py",),
        functions=("*xǁLayerNormǁ*", "*xǁRMSNormǁ*", "*x__check_last_dim__*"),
    ),
    "layers": Target("labkit/nn/layers.py", ("tests/test_layers.py",)),
    "schedules": Target(
        "labkit/train/schedules.py",
        ("tests/test_train.py",),
        pytest_args=("-k", "noam or cosine or constant_lr or schedule"),
    ),
    "losses": Target(
        "labkit/train/losses.py",
        ("tests/test_train.py",),
        pytest_args=(
            "-k",
            "loss or cross_entropy or smoothing or accuracy or batch or metrics or outputs",
        ),
    ),
    "gpt": Target("labkit/models/gpt.py", ("tests/test_gpt.py",)),
    "llama": Target("labkit/models/llama.py", ("tests/test_llama.py",)),
    "bert": Target("labkit/models/bert.py", ("tests/test_bert.py",)),
    "transformer": Target("labkit/models/transformer.py", ("tests/test_transformer_model.py",)),
    "sampling": Target(
        "labkit/generation.py",
        ("tests/test_generation.py",),
        functions=(
            "*x_apply_repetition_penalty__*",
            "*x_apply_temperature__*",
            "*x_top_k_filter__*",
            "*x_top_p_filter__*",
            "*x_suppress_eos__*",
            "*x_process_logits__*",
        ),
    ),
}

# mutmut's exit-code verdicts, grouped for the report
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def _prepare(name: str, target: Target, scratch: Path) -> None:
    """A scratch copy of labkit and the target's tests, with a pyproject that scopes mutmut."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "labkit", scratch / "labkit", ignore=ignore)
    (scratch / "tests").mkdir()
    for helper in ("conftest.py",):
        shutil.copy(ROOT / "tests" / helper, scratch / "tests" / helper)
    for test in target.tests:
        shutil.copy(ROOT / test, scratch / test)
    pytest_args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *target.pytest_args]
    (scratch / "pyproject.toml").write_text(
        f"""[tool.mutmut]
source_paths = ["labkit"]
only_mutate = [{json.dumps(target.source)}]
pytest_add_cli_args = {_toml_list(pytest_args)}
pytest_add_cli_args_test_selection = {_toml_list(target.tests)}
use_git_change_detection = false
timeout_multiplier = 10.0
timeout_constant = 10.0

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "-ra --strict-markers"
markers = ["slow: slow", "book: book", "browser: browser"]
"""
    )


def _verdicts(scratch: Path, source: str, functions: tuple[str, ...]) -> dict[str, str]:
    """mutant name -> verdict, read from mutmut's per-file results."""
    from fnmatch import fnmatch

    from mutmut.stats import status_by_exit_code

    meta = json.loads((scratch / "mutants" / (source + ".meta")).read_text())
    out = {}
    for key, code in meta["exit_code_by_key"].items():
        if functions and not any(fnmatch(key, pattern) for pattern in functions):
            continue
        out[key] = status_by_exit_code[code]
    return out


def run(name: str, show_survivors: bool, max_children: int) -> Counter:
    target = TARGETS[name]
    scratch = ROOT / "build" / "mutation" / name
    _prepare(name, target, scratch)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per test process: children run side by side
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    cmd += list(target.functions)
    print(f"== {name}: {' '.join(cmd)} (in {scratch}, log in mutmut.log)", flush=True)
    with open(scratch / "mutmut.log", "w") as log:  # mutmut draws a progress spinner
        done = subprocess.run(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"mutmut failed on {name}; see {scratch / 'mutmut.log'}")
    verdicts = _verdicts(scratch, target.source, target.functions)
    counts = Counter(verdicts.values())
    if show_survivors:
        for key, verdict in sorted(verdicts.items()):
            if verdict not in KILLED:
                diff = subprocess.run(
                    [sys.executable, "-m", "mutmut", "show", key],
                    cwd=scratch,
                    env=env,
                    capture_output=True,
                    text=True,
                ).stdout
                print(f"--- {key}: {verdict}\n{diff}")
    (scratch / "verdicts.json").write_text(json.dumps(verdicts, indent=1, sort_keys=True))
    return counts


def _forked_pytest(args: list[str], key: str) -> tuple[int, str]:
    """pytest.main(args) in a forked child with mutant ``key`` switched on: (exit code, output)."""
    import pytest

    with tempfile.TemporaryFile("w+") as out:
        pid = os.fork()
        if pid == 0:  # the child: mutmut's trampolines read MUTANT_UNDER_TEST at each call
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            os.environ["MUTANT_UNDER_TEST"] = key
            code = pytest.main(args)
            sys.stdout.flush()
            os._exit(int(code))
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read()


def recheck(name: str, keys: list[str], keyword: str | None = None) -> None:
    """Run the checkout's current tests of ``name`` against mutants of its last run, by name.

    After a test is added for a survivor: copies the target's test files (and conftest) into
    the scratch copy that ``run`` left and runs them with each mutant switched on, as mutmut
    does, without mutmut's time limit (a loaded machine makes that limit report timeouts).
    Like mutmut, it imports the mutated module and the tests once and forks one pytest run
    per mutant.
    ``keyword``: only the tests matching this ``pytest -k`` expression (it replaces the
    target's own ``-k``), e.g. to leave out tests that load a real checkpoint.
    """
    target = TARGETS[name]
    mutants = ROOT / "build" / "mutation" / name / "mutants"
    if not mutants.is_dir():
        sys.exit(f"no earlier run of {name}: run `python benchmarks/mutation.py {name}` first")
    for test in ("tests/conftest.py", *target.tests):
        shutil.copy(ROOT / test, mutants / test)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.chdir(mutants)  # the scratch copy's labkit, not the checkout's (PYTHONPATH)
    sys.path[:] = [str(mutants)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    importlib.import_module(target.source.removesuffix(".py").replace("/", "."))
    args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *target.pytest_args]
    args += list(target.tests) + ([] if keyword is None else ["-k", keyword])
    import pytest

    with contextlib.redirect_stdout(io.StringIO()):  # imports the test modules once, for all
        pytest.main([*args, "--collect-only"])
    for key in keys:
        code, output = _forked_pytest(args, key)
        verdict = {0: "survived", 1: "killed"}.get(code, f"error {code}")
        failed = [line for line in output.splitlines() if line.startswith("FAILED")]
        print(f"{key}: {verdict}" + (f" ({failed[0][7:]})" if failed else ""), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--recheck",
        nargs="+",
        metavar="MUTANT",
        help="run the current tests of one module against these mutants of its last run",
    )
    parser.add_argument(
        "-k", dest="keyword", help="with --recheck: only the tests matching this -k expression"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(TARGETS))
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(TARGETS)}")
    if args.keyword is not None and not args.recheck:
        parser.error("-k goes with --recheck")
    if args.recheck:
        if len(args.modules) != 1:
            parser.error("--recheck needs exactly one module")
        recheck(args.modules[0], args.recheck, args.keyword)
        return
    rows = []
    for name in args.modules or list(TARGETS):
        counts = run(name, args.survivors, args.max_children)
        killed = sum(counts[v] for v in KILLED)
        total = sum(counts.values())
        rows.append((name, TARGETS[name].source, total, killed, counts))
    print("\n| module | file | mutants | killed | survived | no tests | score |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, source, total, killed, counts in rows:
        score = f"{100 * killed / total:.1f}%" if total else "-"
        print(
            f"| {name} | `{source}` | {total} | {killed} | {counts['survived']} "
            f"| {counts['no tests']} | {score} |"
        )


if __name__ == "__main__":
    main()
