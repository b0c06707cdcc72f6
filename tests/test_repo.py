"""The project's own promises: the layout is as documented and CI runs the README's commands."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_command(comment: str) -> str:
    """The command line that follows ``# <comment>`` inside a README code block."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"^# {re.escape(comment)}\n(.+)$", readme, flags=re.MULTILINE)
    assert match, f"README has no code block line '# {comment}'"
    return match.group(1).strip()


def _ci_lines() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_top_level_layout():
    for name in [
        "README.md",
        "pyproject.toml",
        "environment.yml",
        "labkit",
        "notebooks",
        "data",
        "tests",
        "book",
        "benchmarks",
        ".ci/run",
    ]:
        assert (ROOT / name).exists(), f"missing top-level entry {name}"


def test_ci_runs_the_readme_test_command_last():
    assert _ci_lines()[-1] == _readme_command("run the tests")


def test_ci_performs_every_install_step_of_the_readme_setup():
    steps = [step.strip() for step in _readme_command("set up and open the course").split("&&")]
    installs = [step for step in steps if step.startswith("pip install")]
    assert installs, "the README's setup command installs nothing"
    ci = _ci_lines()
    for step in installs:
        assert step in ci, f"README setup step {step!r} is not in .ci/run"
    # torch's CPU build must come before the package, or pip would fetch a CUDA build.
    assert ci.index(installs[0]) < ci.index(installs[-1])
    assert installs[0].startswith("pip install torch==")


def test_environment_yml_installs_from_pyproject():
    env = (ROOT / "environment.yml").read_text()
    assert "python=3.11" in env
    assert "-e .[dev,book]" in env


def test_code_is_lint_clean():
    """ruff (configured in pyproject.toml) finds nothing in the package, tests or benchmarks."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--output-format",
            "concise",
            "labkit",
            "tests",
            "benchmarks",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
