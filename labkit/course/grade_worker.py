"""Execute one prepared submission inside the sandbox and report each cell as it finishes.

``labkit grade`` starts ``python -m labkit.course.grade_worker NOTEBOOK ...`` through
:func:`labkit.course.sandbox.run_sandboxed`. The worker runs the notebook with nbclient (the engine
papermill and nbgrader use) and keeps going after a failing cell, so one wrong task costs only
its own checks. It writes one JSON line per event to its stdout, which only the grader reads:

- ``{"event": "start", "kernel_pid": ...}`` once the kernel is up;
- ``{"event": "cell", "index": i, "outputs": [...], "error": {...} or null, ...}`` after each
  code cell (``error`` is the exception the cell raised, a cell timeout, or an output that
  passed the size limit);
- ``{"event": "died", "index": i, "returncode": ..., "log": ...}`` when the kernel died
  (memory, CPU time, a crash) while running cell ``i``;
- ``{"event": "done"}`` at the end.

A run killed at its wall-clock limit simply stops writing: the grader keeps the cells reported
so far. The student's code runs in the kernel, a child process with its own rlimits (address
space, CPU time, file size) and its stdout and stderr sent to a log file, so it cannot write
to this channel; the worker is also marked non-dumpable, so the kernel cannot reach the channel
through ``/proc``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KERNEL_LOG = ".kernel.log"
PR_SET_DUMPABLE = 4
MB = 1 << 20
TOTAL_OUTPUT_CELLS = 20  # a notebook keeps at most 20 cells' worth of output


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def _limit(pid: int, which: int, value: int | None) -> None:
    if value is not None:
        resource.prlimit(pid, which, (value, value))


def _output_bytes(out: Any) -> int:
    if out.get("output_type") == "stream":
        return len(out.get("text", ""))
    data = out.get("data", {})
    return sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in data.values())


def _client_class():
    from nbclient import NotebookClient

    class CappedClient(NotebookClient):
        """nbclient that keeps at most ``max_output_bytes`` of output per cell, and
        ``TOTAL_OUTPUT_CELLS`` times that in the whole notebook."""

        max_output_bytes = 1 * MB
        total = 0

        def output(self, outs, msg, display_id, cell_index):  # noqa: D102 (nbclient's hook)
            from nbformat.v4 import output_from_msg

            try:
                size = _output_bytes(output_from_msg(msg))
            except ValueError:
                size = 0
            kept = sum(_output_bytes(o) for o in outs)
            full = self.total + size > TOTAL_OUTPUT_CELLS * self.max_output_bytes
            if cell_index in self.overflow or kept + size > self.max_output_bytes or full:
                self.overflow[cell_index] = self.overflow.get(cell_index, kept) + size
                return None
            self.total += size
            return super().output(outs, msg, display_id, cell_index)

    return CappedClient


def run(args: argparse.Namespace) -> int:
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient.exceptions import DeadKernelError

    workdir = Path.cwd()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if args.file_mb:
        size = args.file_mb * MB
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    try:  # keep the kernel (same user) out of /proc/<worker>/fd: this channel is the grade
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass

    nb = nbformat.read(args.notebook, as_version=4)
    km = AsyncKernelManager(kernel_name=args.kernel, transport="ipc", ip=str(workdir / ".kernel"))
    client = _client_class()(
        nb,
        km=km,
        timeout=args.cell_timeout,
        interrupt_on_timeout=True,
        error_on_timeout={
            "ename": "CellTimeoutError",
            "evalue": f"the cell ran longer than {args.cell_timeout} s and was interrupted",
            "traceback": [],
        },
        allow_errors=True,
        record_timing=False,
        iopub_timeout=10,
    )
    client.max_output_bytes = int(args.max_output_mb * MB)
    client.overflow = {}  # cell index -> bytes of output printed
    state: dict[str, Any] = {"index": None, "start": 0.0}

    def started(notebook) -> None:
        pid = km.provisioner.process.pid  # type: ignore[union-attr]
        state["pid"] = pid
        _limit(pid, resource.RLIMIT_AS, args.memory_mb * MB if args.memory_mb else None)
        _limit(pid, resource.RLIMIT_CPU, args.cpu_s or None)
        _limit(pid, resource.RLIMIT_FSIZE, args.file_mb * MB if args.file_mb else None)
        _limit(pid, resource.RLIMIT_CORE, 0)
        _emit({"event": "start", "kernel_pid": pid})

    def before(cell, cell_index) -> None:
        state["index"], state["start"] = cell_index, time.perf_counter()

    def after(cell, cell_index, execute_reply) -> None:
        content = (execute_reply or {}).get("content", {})
        error = None
        if content.get("status") == "error":
            error = {k: content.get(k) for k in ("ename", "evalue", "traceback")}
        overflow = client.overflow.get(cell_index)
        if overflow is not None and error is None:
            error = {
                "ename": "OutputLimitExceeded",
                "evalue": f"the cell printed {overflow / MB:.1f} MB of output; the limit is "
                f"{args.max_output_mb:g} MB per cell and {TOTAL_OUTPUT_CELLS} times that per "
                "notebook (the rest was dropped)",
                "traceback": [],
            }
        _emit(
            {
                "event": "cell",
                "index": cell_index,
                "execution_count": cell.get("execution_count"),
                "outputs": cell.get("outputs", []),
                "error": error,
                "seconds": round(time.perf_counter() - state["start"], 3),
            }
        )

    client.on_notebook_start = started
    client.on_cell_execute = before
    client.on_cell_executed = after
    log = open(workdir / KERNEL_LOG, "wb")  # the kernel's own stdout and stderr
    try:
        client.execute(stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(workdir))
    except DeadKernelError:
        process = getattr(km.provisioner, "process", None)
        code = process.poll() if process is not None else None
        log.flush()
        text = (workdir / KERNEL_LOG).read_bytes()[-4000:].decode("utf-8", "replace")
        _emit({"event": "died", "index": state["index"], "returncode": code, "log": text})
        return 0
    finally:
        log.close()
    _emit({"event": "done"})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.course.grade_worker")
    parser.add_argument("notebook")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--cell-timeout", type=int, default=600)
    parser.add_argument("--memory-mb", type=int, default=0, help="kernel address space")
    parser.add_argument("--cpu-s", type=int, default=0, help="kernel CPU time")
    parser.add_argument("--file-mb", type=int, default=0, help="largest file written")
    parser.add_argument("--max-output-mb", type=float, default=1.0, help="output kept per cell")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
