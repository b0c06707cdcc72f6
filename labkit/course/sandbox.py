"""Run untrusted code (a student's notebook) in a throwaway sandbox: the process side of
``labkit grade``.

What one sandboxed run gets, and how:

- **its own processes**, killed as a group when the run ends or passes its wall-clock limit
  (a PID namespace where one is available, else a process session);
- **a fresh working directory** holding only what the grader copied into it; it is the
  sandbox's ``HOME`` too, and ``/tmp`` is an empty in-memory folder;
- **a read-only view of the machine** (``bwrap --ro-bind / /``), in which the grader's home,
  the other submissions and the grades folder are replaced by empty folders (``hide``), the
  Python environment and the course checkout read-only (``allow_read``);
- **no network**: a new network namespace holds only its own loopback interface, so even
  ``127.0.0.1`` on the grader's machine is out of reach;
- **an allow-list environment**: only the variables in :data:`ENV_ALLOW` (locale, ``PATH``,
  ``PYTHONPATH``, thread counts, offline flags) and those named by the caller; nothing else of
  the grader's environment (tokens, keys) is passed on;
- **resource limits** (``resource`` rlimits), set by :mod:`labkit.course.grade_worker` on the kernel
  that runs the student's code: address space (memory), CPU time, size of any file written.

The isolation comes from bubblewrap (``bwrap``, Debian package ``bubblewrap``). Without it
``unshare`` still gives the network namespace and the process group but neither the
read-only view nor the hidden folders; without either, the code runs with the grader's
rights and only the limits, the working directory and the environment apply.
:func:`isolation` says which of these the machine offers and :func:`isolation_warnings`
spells out what is missing; ``labkit grade`` prints those warnings and writes them into its
report. None of this replaces running the grader in a disposable container or VM on a shared
server: the kernel is shared with the host, and a sandbox escape through a kernel bug is out of
scope.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Variables a sandboxed run may inherit from the grader (exact names, plus the LC_ prefix).
ENV_ALLOW = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
)
ENV_ALLOW_PREFIXES = ("LC_",)
WORKDIR_IN_SANDBOX = "/tmp/submission"  # where bwrap shows the working directory
MODES = ("bwrap", "unshare", "none")


@dataclass(frozen=True)
class Isolation:
    """What the machine offers: ``mode`` is ``"bwrap"``, ``"unshare"`` or ``"none"``."""

    mode: str
    detail: str  # why the stronger modes are unavailable ("" for bwrap)

    @property
    def network(self) -> bool:
        """True when sandboxed runs get their own network namespace."""
        return self.mode in ("bwrap", "unshare")

    @property
    def filesystem(self) -> bool:
        """True when sandboxed runs see the machine read-only, with hidden folders."""
        return self.mode == "bwrap"


def _works(command: list[str]) -> str:
    """An empty string if ``command`` runs and exits 0, else a one-line reason."""
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{command[0]}: {err}"
    if run.returncode != 0:
        lines = (run.stderr or run.stdout).strip().splitlines()
        return f"{command[0]} exited with {run.returncode}: {lines[-1] if lines else ''}"
    return ""


def _root() -> bool:
    return os.geteuid() == 0


@functools.cache
def isolation(strongest: str = "bwrap") -> Isolation:
    """Probe once which isolation works here: bwrap, then unshare, else none.

    ``strongest`` skips the stronger modes (``"unshare"``: do not try bwrap; ``"none"``: no
    isolation), for machines where a stronger mode misbehaves, and for tests of the fallbacks.
    """
    if strongest not in MODES:
        raise ValueError(f"isolation must be one of {MODES}, got {strongest!r}")
    reasons = []
    bwrap = shutil.which("bwrap")
    if strongest != "bwrap":
        reasons.append(f"isolation {strongest!r} was asked for")
    elif bwrap is None:
        reasons.append("bwrap is not installed (Debian: apt-get install bubblewrap)")
    else:
        probe = _bwrap_prefix(bwrap, None, [], []) + ["true"]
        why = _works(probe)
        if not why:
            return Isolation("bwrap", "")
        reasons.append(f"bwrap cannot create namespaces here ({why})")
    unshare = shutil.which("unshare")
    if strongest == "none":
        pass
    elif unshare is None:
        reasons.append("unshare is not installed")
    else:
        why = _works(_unshare_prefix(unshare) + ["true"])
        if not why:
            return Isolation("unshare", "; ".join(reasons))
        reasons.append(f"unshare cannot create a network namespace ({why})")
    return Isolation("none", "; ".join(reasons))


def isolation_warnings(iso: Isolation | None = None) -> list[str]:
    """What a sandboxed run lacks on this machine, one sentence each (empty with bwrap)."""
    iso = iso or isolation()
    warnings = []
    if not iso.filesystem:
        warnings.append(
            "no filesystem isolation: submissions run with the grader's file permissions and "
            "can read and write the grader's files, home and the other submissions "
            f"({iso.detail})"
        )
    if not iso.network:
        warnings.append(
            "no network isolation: submissions can open network connections, including to "
            "services on 127.0.0.1"
        )
    return warnings


def sandbox_env(workdir: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a sandboxed run: the allow-listed variables of this process, a home,
    Jupyter and matplotlib folders inside ``workdir``, offline Hugging Face, then ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ENV_ALLOW or any(k.startswith(p) for p in ENV_ALLOW_PREFIXES)
    }
    workdir = str(workdir)
    env.update(
        HOME=workdir,
        TMPDIR="/tmp",
        JUPYTER_RUNTIME_DIR=f"{workdir}/.jupyter/runtime",
        JUPYTER_DATA_DIR=f"{workdir}/.jupyter/data",
        JUPYTER_CONFIG_DIR=f"{workdir}/.jupyter/config",
        JUPYTER_PLATFORM_DIRS="1",
        IPYTHONDIR=f"{workdir}/.ipython",
        MPLCONFIGDIR=f"{workdir}/.matplotlib",
        MPLBACKEND="Agg",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    env.update(extra or {})
    return env


def required_read_paths() -> list[Path]:
    """What every run must read: Python, its environment, labkit's checkout, PYTHONPATH."""
    import site
    import sysconfig

    import labkit

    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()]
    paths += [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    paths.append(Path(labkit.__file__).resolve().parents[1])  # the package and its data/
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths.append(Path(sys.executable).resolve().parent)
    return _unique(Path(p).resolve() for p in paths if Path(p).exists())


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: list[Path] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return seen


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _bwrap_prefix(
    bwrap: str,
    workdir: Path | None,
    hide: list[Path],
    allow_read: list[Path],
    *,
    workdir_dest: str = WORKDIR_IN_SANDBOX,
) -> list[str]:
    """The bwrap command line (without the command to run); see the module docstring.

    Mount order matters (later mounts cover earlier ones): the machine read-only, fresh
    /dev, /proc and /tmp; every hidden folder replaced by an empty one (hidden files by
    /dev/null); the paths of ``allow_read`` that a hidden folder covered bound back read-only,
    hidden paths inside those hidden again; the working directory writable last.
    """
    cmd = [bwrap, "--die-with-parent", "--new-session", "--unshare-all"]
    if _root():  # root inside the namespace keeps its capabilities (it could remount rw)
        cmd += ["--cap-drop", "ALL"]
    cmd += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    hide = sorted(_unique(p.resolve() for p in hide if p.exists()), key=lambda p: len(p.parts))
    dirs = [p for p in hide if p.is_dir()]
    files = [p for p in hide if not p.is_dir()]

    def cover(folders: list[Path]) -> None:
        for folder in folders:
            cmd.extend(["--tmpfs", str(folder)])

    tmp = Path("/tmp")  # an empty tmpfs already
    top = [d for d in dirs if not any(_under(d, o) for o in [*dirs, tmp] if o != d)]
    cover(top)
    covered = [*top, tmp]
    rebound = [p for p in allow_read if any(_under(p, d) for d in covered)]
    for path in sorted(rebound, key=lambda p: len(p.parts)):
        cmd.extend(["--ro-bind-try", str(path), str(path)])
    inner = [d for d in dirs if any(_under(d, r) and d != r for r in rebound)]
    cover(inner)

    def visible(path: Path) -> bool:
        if any(_under(path, d) for d in inner):
            return False
        return any(_under(path, r) for r in rebound) or not any(_under(path, c) for c in covered)

    for path in files:
        if visible(path):
            cmd.extend(["--ro-bind", "/dev/null", str(path)])
    if workdir is not None:
        cmd += ["--bind", str(workdir), workdir_dest, "--chdir", workdir_dest]
    return cmd


def _unshare_prefix(unshare: str) -> list[str]:
    cmd = [unshare, "--net", "--pid", "--fork", "--kill-child"]
    if not _root():
        cmd.insert(1, "--map-root-user")  # an unprivileged user namespace first
    return cmd


@dataclass
class SandboxRun:
    """How a sandboxed command ended: ``returncode`` (None when killed at the time limit),
    ``timed_out``, its stdout lines (received as they came, so a run killed midway keeps what
    it wrote before) and the last lines of its stderr."""

    returncode: int | None
    timed_out: bool
    lines: list[str]
    stderr_tail: str
    seconds: float


def run_sandboxed(
    command: list[str],
    workdir: str | Path,
    *,
    timeout_s: float,
    hide: Iterable[str | Path] = (),
    allow_read: Iterable[str | Path] = (),
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    iso: Isolation | None = None,
    max_line_bytes: int = 256 << 20,
) -> SandboxRun:
    """Run ``command`` in the sandbox with ``workdir`` as its working directory and home.

    ``command`` is run as given (its ``python`` should be ``sys.executable``); with bwrap the
    working directory appears as :data:`WORKDIR_IN_SANDBOX` inside, and ``workdir``'s own
    path refers to that. ``hide`` are folders and files made invisible; ``allow_read`` are
    paths that stay readable even inside a hidden folder (:func:`required_read_paths` is
    always added). The run is killed, with every process it started, after ``timeout_s``
    seconds of wall-clock time.
    """
    import time

    iso = iso or isolation()
    workdir = Path(workdir).resolve()
    allow = _unique([*required_read_paths(), *(Path(p).resolve() for p in allow_read)])
    hidden = [Path(p) for p in hide]
    inside = str(workdir)
    if iso.mode == "bwrap":
        prefix = _bwrap_prefix(shutil.which("bwrap") or "bwrap", workdir, hidden, allow)
        inside = WORKDIR_IN_SANDBOX
    elif iso.mode == "unshare":
        prefix = _unshare_prefix(shutil.which("unshare") or "unshare")
    else:
        prefix = []
    run_env = sandbox_env(inside, env)
    start = time.perf_counter()
    proc = subprocess.Popen(
        prefix + command,
        cwd=workdir,
        env=run_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # one process group to kill at the end
    )
    lines: list[str] = []
    stderr: list[bytes] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for raw in iter(lambda: proc.stdout.readline(max_line_bytes), b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            if on_line is not None:
                on_line(line)

    def read_stderr() -> None:  # keep the last 64 KiB
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read(65536), b""):
            stderr.append(chunk)
            while len(stderr) > 1:
                stderr.pop(0)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)
    for reader in readers:
        reader.join(timeout=10)
    tail = b"".join(stderr).decode("utf-8", "replace")
    return SandboxRun(
        None if timed_out else proc.returncode,
        timed_out,
        lines,
        "\n".join(tail.strip().splitlines()[-20:]),
        time.perf_counter() - start,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the run's process group (with bwrap/unshare: its PID namespace goes with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
