"""Data-parallel training on several processes with PyTorch's own engine (``torch.distributed``).

Symbols: W = world size (number of processes), r = rank (0 .. W-1), B = global batch size,
b = B // W = the batch each process sees.

The idea in four lines. Every process holds a full copy of the model and starts from the
same weights. Each step, process r reads its own slice of b examples of the global batch,
runs forward and backward on it, and ``DistributedDataParallel`` (DDP) averages the W
gradients with an all-reduce before the optimizer step, so every copy takes the same step
and the weights stay identical. Averaging W means over b examples is the mean over all B
examples, so W processes with b examples each compute the same step as one process with B.

``torchrun`` starts the W processes and tells each who it is through environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). The helpers
here turn that environment into a :class:`DistributedInfo` and do nothing at all when the
script runs as a plain single process, so one training script serves both cases::

    info = init_distributed(device)                      # world_size 1 without torchrun
    model = wrap_model(model, info, device)              # DDP when W > 1, else the model
    sampler = make_sampler(dataset, info, shuffle=True, seed=0)  # None when W == 1
    ...
    loss = all_reduce_mean(loss, info)                   # the same number on every rank
    cleanup(info)

:func:`run_torchrun` launches such a script on W local processes from Python (or Jupyter)
and turns a crash or a hang of any worker into an error that shows the workers' output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler

# The environment variables torchrun sets for every worker; the rendezvous address is only
# needed when there is more than one process.
_IDENTITY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedInfo:
    """Who this process is in a (possibly one-process) data-parallel run.

    ``backend`` is ``"gloo"`` (CPU) or ``"nccl"`` (CUDA) when a process group exists, and
    ``None`` for a single process, which needs no communication at all.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when there is more than one process, so gradients must be averaged."""
        return self.world_size > 1


SINGLE_PROCESS = DistributedInfo(rank=0, world_size=1, local_rank=0, backend=None)

# Module state: the info returned by the first init_distributed call (so later calls return
# the same one) and whether this module created the process group (so cleanup destroys only
# a group it owns, never one a caller set up itself).
_info: DistributedInfo | None = None
_created_group = False


def _env_int(name: str) -> int:
    """Read a torchrun variable as a non-negative int, naming it if it is missing or bad."""
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(
            f"environment variable {name} is not set, but {_present_identity_vars()} are: "
            "launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK together"
        )
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must be >= 0, got {raw!r}")
    return value


def _present_identity_vars() -> list[str]:
    return [name for name in _IDENTITY_VARS if name in os.environ]


def _info_from_env(device: torch.device) -> DistributedInfo:
    """Build the info from torchrun's variables, checking them before any process group exists."""
    if not _present_identity_vars():
        return SINGLE_PROCESS
    rank, world_size, local_rank = (_env_int(name) for name in _IDENTITY_VARS)
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world_size}")
    if rank >= world_size:
        raise ValueError(f"environment variable RANK={rank} must be < WORLD_SIZE={world_size}")
    if world_size == 1:
        return SINGLE_PROCESS
    for name in _RENDEZVOUS_VARS:
        if not os.environ.get(name):
            raise ValueError(
                f"environment variable {name} is not set; with WORLD_SIZE={world_size} the "
                "processes need MASTER_ADDR and MASTER_PORT to find each other (torchrun sets them)"
            )
    _env_int("MASTER_PORT")
    if device.type == "cuda":
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(
            f"distributed training runs on 'cpu' (gloo) or 'cuda' (nccl), got {device}"
        )
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def init_distributed(device: torch.device | str, *, timeout_s: float = 300.0) -> DistributedInfo:
    """Join the process group torchrun set up, or return single-process info without torchrun.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``
    when ``WORLD_SIZE > 1``) and initialises ``torch.distributed`` with gloo on the CPU or
    nccl on CUDA, where it also makes ``cuda:LOCAL_RANK`` this process's current device, so a
    plain ``"cuda"`` means one GPU per process. ``timeout_s`` bounds every collective, so a
    worker whose partner died fails instead of waiting forever. Calling it again returns the
    same info without touching the process group, so library code may call it freely.
    """
    global _info, _created_group
    if _info is not None:
        return _info
    if not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    device = torch.device(device)
    info = _info_from_env(device)
    if info.enabled:
        if info.backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        if dist.is_initialized():  # the caller created the group: use it, leave it to them
            if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
                raise ValueError(
                    f"an existing process group has rank {dist.get_rank()} of "
                    f"{dist.get_world_size()}, but the environment says RANK={info.rank} of "
                    f"WORLD_SIZE={info.world_size}"
                )
            info = DistributedInfo(info.rank, info.world_size, info.local_rank, dist.get_backend())
        else:
            store = _attempt_store(info, timedelta(seconds=timeout_s))
            dist.init_process_group(
                backend=info.backend,
                init_method=None if store is not None else "env://",
                store=store,
                rank=info.rank,
                world_size=info.world_size,
                timeout=timedelta(seconds=timeout_s),
                # Binding NCCL to this rank's GPU up front avoids it guessing (and warning).
                device_id=torch.device("cuda", info.local_rank) if info.backend == "nccl" else None,
            )
            _created_group = True
    _info = info
    return info


def _attempt_store(info: DistributedInfo, timeout: timedelta) -> dist.Store | None:
    """After an elastic restart (``torchrun --max-restarts``), a key space of this attempt's
    own in torchrun's store; None otherwise (then ``env://`` does the usual).

    torchrun keeps one store across restarts, and the workers of a new attempt would find the
    addresses that the dead attempt's workers published there, and fail to connect to them
    (pytorch/pytorch#167288); a prefix per attempt keeps the attempts apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt in (None, "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        info.world_size,
        is_master=False,  # torchrun's agent hosts it
        timeout=timeout,
    )
    return dist.PrefixStore(f"labkit/attempt_{attempt}/", store)


def local_device(device: torch.device | str, info: DistributedInfo) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for CUDA runs, else ``device``.

    With several GPUs per machine each process must own one of them; the index makes that
    explicit wherever tensors are created.
    """
    device = torch.device(device)
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def wrap_model(model: nn.Module, info: DistributedInfo, device: torch.device | str) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when there are several processes.

    DDP copies rank 0's weights to every rank once, then averages gradients across ranks
    during ``backward()``. The model is moved to this rank's device first, because DDP needs
    its parameters where the computation happens. With one process the model is returned
    unchanged. :func:`unwrap_model` gives back the plain model (e.g. to save its state dict).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not info.enabled:
        return model
    _check_group(info)
    device = local_device(device, info)
    model = model.to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (or the model itself), whose state dict has no
    ``module.`` prefix and so loads into an unwrapped copy."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def make_sampler(
    dataset: Dataset, info: DistributedInfo, *, shuffle: bool, seed: int
) -> Sampler | None:
    """A ``DistributedSampler`` giving each rank its own 1/W of ``dataset``; None for one process.

    The sampler deals the (optionally shuffled, with ``seed``) index list out like cards:
    rank r gets positions r, r + W, r + 2W, ... With per-rank batches of b = B // W the W
    batches of step k therefore cover exactly positions k*B .. k*B + B - 1: the k-th batch of
    one process reading the same sampler with ``num_replicas=1`` (as the Trainer does), so
    shuffled runs on 1 and W processes see the same global batches. ``drop_last=True`` trims
    the tail so every rank gets the same number of examples; otherwise the ranks would run
    different numbers of steps and the gradient all-reduce would wait forever. Call
    ``sampler.set_epoch(epoch)`` each epoch to get a fresh shuffle.
    """
    if not info.enabled:
        return None
    _check_group(info)
    if len(dataset) < info.world_size:
        raise ValueError(
            f"dataset has {len(dataset)} examples, fewer than the {info.world_size} processes"
        )
    return DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=True,
    )


def all_reduce_mean(value: float | torch.Tensor, info: DistributedInfo) -> float:
    """The mean of ``value`` over all ranks, returned on every rank (``value`` for one process).

    Each rank's loss is measured on its own slice of the batch; the mean is the loss of the
    whole global batch, the number a single-process run would log. Every rank must call it.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"value must be a single number, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"value must be a number, got {type(value).__name__}")
    if not info.enabled:
        return float(value)
    _check_group(info)
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else "cpu"
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() / info.world_size


def barrier(info: DistributedInfo) -> None:
    """Wait until every rank gets here, e.g. so others read a file only after rank 0 wrote it."""
    if info.enabled:
        _check_group(info)
        dist.barrier()


def cleanup(info: DistributedInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it, and forget the info.

    A group the caller created itself is left alone. After this, ``init_distributed`` reads
    the environment afresh.
    """
    global _info, _created_group
    if _created_group and info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _created_group = False
    _info = None


def _check_group(info: DistributedInfo) -> None:
    if not dist.is_initialized():
        raise ValueError(
            f"info says world_size={info.world_size} but no process group exists; "
            "get the info from init_distributed()"
        )
    if dist.get_world_size() != info.world_size:
        raise ValueError(
            f"info says world_size={info.world_size} but the process group has "
            f"{dist.get_world_size()} processes"
        )


# ---------------------------------------------------------------------------------------------
# Launching: torchrun from Python or Jupyter
# ---------------------------------------------------------------------------------------------

# How much of the workers' output an error message shows; the error object keeps all of it.
_TAIL_CHARS = 10_000
# How long torchrun waits for its workers to exit after SIGTERM before it SIGKILLs them.
_TORCHRUN_SHUTDOWN_S = 30


class TorchrunError(RuntimeError):
    """A torchrun launch that failed or timed out; carries the full output of the workers."""

    def __init__(self, message: str, *, returncode: int | None, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def torchrun_command(
    script_or_module: str | Path, nproc: int, args: list[str], *, max_restarts: int = 0
) -> list[str]:
    """The command line that :func:`run_torchrun` runs, handy to print or paste in a terminal.

    A path ending in ``.py`` (or an existing file) is run as a script; anything else, such as
    ``"mypackage.train"``, as a module (``-m``). ``--standalone`` runs a private rendezvous on
    this machine with a free port, so several launches never collide. ``max_restarts`` > 0
    makes the run elastic: when a worker dies, torchrun stops the others and starts all W
    again (up to that many times); a script that resumes from its latest checkpoint
    (``Trainer.fit(resume_from=latest_checkpoint(folder))``) then carries on from there.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
    if not all(isinstance(arg, str) for arg in args):
        raise ValueError(f"args must be a list of strings, got {args!r}")
    target = str(script_or_module)
    if not target:
        raise ValueError("script_or_module must name a script or a module, got ''")
    is_script = target.endswith(".py") or Path(target).is_file()
    if is_script and not Path(target).is_file():
        raise ValueError(f"script {target!r} does not exist")
    launcher = [sys.executable, "-m", "torch.distributed.run"]  # torchrun of this interpreter
    options = ["--standalone", "--nproc_per_node", str(nproc)]
    options += ["--max_restarts", str(max_restarts)] if max_restarts else []
    return [*launcher, *options, *([target] if is_script else ["-m", target]), *args]


def run_torchrun(
    script_or_module: str | Path,
    nproc: int,
    args: list[str],
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    max_restarts: int = 0,
) -> subprocess.CompletedProcess:
    """Launch ``torchrun --standalone --nproc_per_node nproc`` and wait at most ``timeout`` s.

    A notebook cannot become several processes itself, but it can start them: this runs the
    script as ``nproc`` workers on this machine and returns their combined stdout/stderr. If
    any worker fails, or the run is still going after ``timeout`` seconds (then the launcher
    and all its workers are stopped), it raises :class:`TorchrunError` whose message ends
    with the workers' output, so the real traceback is visible. An interrupt (Jupyter's stop
    button) stops the workers too. ``env`` adds variables to this process's environment for
    the workers. ``max_restarts``: see :func:`torchrun_command`.
    """
    command = torchrun_command(script_or_module, nproc, args, max_restarts=max_restarts)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    worker_env = {**os.environ, **(env or {})}
    # Variables of an enclosing torchrun run would confuse the new one's workers.
    for name in (*_IDENTITY_VARS, *_RENDEZVOUS_VARS, "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        worker_env.pop(name, None)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _stop_torchrun(process)
        raise TorchrunError(
            f"torchrun did not finish within {timeout:g} s and was stopped "
            f"(a worker may be stuck waiting for another).\ncommand: {' '.join(command)}\n"
            f"{_output_tail(stdout, stderr)}",
            returncode=None,
            stdout=stdout,
            stderr=stderr,
        ) from None
    except BaseException:  # e.g. KeyboardInterrupt: leave no workers running on their own
        _stop_torchrun(process)
        raise
    if process.returncode != 0:
        raise TorchrunError(
            f"torchrun exited with code {process.returncode}.\ncommand: {' '.join(command)}\n"
            f"{_output_tail(stdout, stderr)}",
            returncode=process.returncode,
            stdout=stdout,
            stderr=stderr,
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _stop_torchrun(process: subprocess.Popen) -> tuple[str, str]:
    """Stop torchrun and its workers and collect what they printed.

    torchrun starts each worker in a session of its own, so the workers are reached through
    torchrun: on SIGTERM it sends SIGTERM to them and SIGKILLs any still running after its
    shutdown timeout. SIGKILL from here comes only if torchrun itself is stuck.
    """
    process.terminate()
    try:
        return process.communicate(timeout=_TORCHRUN_SHUTDOWN_S + 15)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate(timeout=10)


def _output_tail(stdout: str, stderr: str) -> str:
    def tail(text: str) -> str:
        text = text or ""
        return text if len(text) <= _TAIL_CHARS else "...\n" + text[-_TAIL_CHARS:]

    return f"--- workers' stderr ---\n{tail(stderr)}\n--- workers' stdout ---\n{tail(stdout)}"
