"""labkit.train: single-process behaviour, environment checks, and real 2-process runs.

The launching tests start torchrun with 2 CPU processes (gloo) on this machine; every wait is
bounded by run_torchrun's timeout, so a hang fails the test instead of blocking the suite.
"""

import importlib.util
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

import labkit.train.distributed as distributed
from labkit.train import (
    DistributedInfo,
    TorchrunError,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    local_device,
    make_sampler,
    run_torchrun,
    torchrun_command,
    unwrap_model,
    wrap_model,
)
from labkit.train.distributed import SINGLE_PROCESS

TESTS = Path(__file__).resolve().parent
TRAIN_SCRIPT = TESTS / "ddp_train_script.py"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CPU = torch.device("cpu")
TWO_RANKS = DistributedInfo(rank=1, world_size=2, local_rank=1, backend="gloo")


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process not launched by torchrun, with nothing remembered."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_info", None)


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


# --- one process: everything is a no-op ----------------------------------------------------


def test_plain_process_is_a_world_of_one():
    info = init_distributed(CPU)
    assert info == SINGLE_PROCESS
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.is_main and not info.enabled
    assert not dist.is_initialized()


def test_init_is_idempotent_until_cleanup(monkeypatch):
    first = init_distributed(CPU)
    _torchrun_env(monkeypatch, RANK="zero", WORLD_SIZE="2", LOCAL_RANK="0")
    assert init_distributed("cpu") is first  # remembered: the environment is not read again
    cleanup(first)
    with pytest.raises(ValueError, match="RANK must be an integer, got 'zero'"):
        init_distributed(CPU)  # forgotten: read afresh


def test_torchrun_with_one_process_needs_no_process_group(monkeypatch):
    _torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    assert init_distributed(CPU) == SINGLE_PROCESS
    assert not dist.is_initialized()


def test_helpers_are_identities_for_one_process():
    info = init_distributed(CPU)
    model = nn.Linear(2, 2)
    assert wrap_model(model, info, CPU) is model
    assert unwrap_model(model) is model
    assert make_sampler(TensorDataset(torch.zeros(4)), info, shuffle=True, seed=0) is None
    assert all_reduce_mean(2, info) == 2.0
    assert all_reduce_mean(torch.tensor(1.5), info) == 1.5
    assert local_device("cpu", info) == CPU
    barrier(info)  # returns at once
    cleanup(info)


def test_info_properties():
    assert TWO_RANKS.enabled and not TWO_RANKS.is_main
    assert DistributedInfo(0, 2, 0, "gloo").is_main


@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_batches_of_a_step_make_up_the_global_batch(shuffle):
    """What make_sampler's equivalence rests on: with b = B / W examples per rank, the W batches
    of step k are exactly the k-th batch of B of the same sampler with one replica."""
    dataset = TensorDataset(torch.arange(23))  # odd: drop_last trims one example for W = 2
    batch, world = 6, 2

    def batches(rank: int, replicas: int, size: int) -> list[list[int]]:
        sampler = DistributedSampler(
            dataset, replicas, rank, shuffle=shuffle, seed=3, drop_last=True
        )
        order = list(sampler)
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    single = batches(0, 1, batch)
    per_rank = [batches(rank, world, batch // world) for rank in range(world)]
    steps = len(per_rank[0])
    assert steps == len(single) == 3
    for k in range(steps):
        assert sorted(sum((per_rank[r][k] for r in range(world)), [])) == sorted(single[k])


# --- bad input is a ValueError naming the culprit --------------------------------------------


@pytest.mark.parametrize(
    ("env", "culprit"),
    [
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
        ({"RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE is not set"),
        (
            {"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            "RANK must be an integer, got 'one'",
        ),
        ({"RANK": "0", "WORLD_SIZE": "2.0", "LOCAL_RANK": "0"}, "WORLD_SIZE must be an integer"),
        ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK must be >= 0"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 must be < WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE must be >= 1"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
            "MASTER_PORT is not set",
        ),
        (
            {
                "RANK": "0",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "http",
            },
            "MASTER_PORT must be an integer, got 'http'",
        ),
    ],
)
def test_bad_torchrun_environment_names_the_variable(monkeypatch, env, culprit):
    _torchrun_env(monkeypatch, **env)
    with pytest.raises(ValueError, match=culprit):
        init_distributed(CPU)
    assert not dist.is_initialized()


def test_unsupported_device_for_several_processes(monkeypatch):
    _torchrun_env(
        monkeypatch,
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )
    with pytest.raises(ValueError, match="got mps"):
        init_distributed(torch.device("mps"))


def test_init_rejects_a_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s .* got 0"):
        init_distributed(CPU, timeout_s=0)


def test_helpers_need_a_process_group_when_info_says_several():
    with pytest.raises(ValueError, match="world_size=2 but no process group"):
        wrap_model(nn.Linear(2, 2), TWO_RANKS, CPU)
    with pytest.raises(ValueError, match="world_size=2 but no process group"):
        make_sampler(TensorDataset(torch.zeros(4)), TWO_RANKS, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="world_size=2 but no process group"):
        all_reduce_mean(1.0, TWO_RANKS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="nn.Module, got Tensor"):
        wrap_model(torch.zeros(2), SINGLE_PROCESS, CPU)
    with pytest.raises(ValueError, match="a number, got str"):
        all_reduce_mean("1.0", SINGLE_PROCESS)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        all_reduce_mean(torch.zeros(2), SINGLE_PROCESS)


# --- launching ---------------------------------------------------------------------------------


def test_torchrun_command_runs_scripts_and_modules():
    script = torchrun_command(TRAIN_SCRIPT, 2, ["out"])
    assert script[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert script[3:] == ["--standalone", "--nproc_per_node", "2", str(TRAIN_SCRIPT), "out"]
    module = torchrun_command("labkit.course.demo", 1, [])
    assert module[-2:] == ["-m", "labkit.course.demo"]


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"nproc": 0}, "nproc must be a positive int, got 0"),
        ({"args": ["--steps", 3]}, "args must be a list of strings"),
        ({"script_or_module": "missing_script.py"}, "'missing_script.py' does not exist"),
        ({"timeout": -1}, "timeout must be a positive number of seconds, got -1"),
    ],
)
def test_run_torchrun_checks_its_arguments(kwargs, culprit):
    call = {"script_or_module": TRAIN_SCRIPT, "nproc": 2, "args": [], "timeout": 10, **kwargs}
    with pytest.raises(ValueError, match=culprit):
        run_torchrun(**call)


@pytest.mark.slow
def test_run_torchrun_shows_a_failing_workers_stderr(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import os, sys\n"
        "print('rank', os.environ['RANK'], 'says hello')\n"
        "sys.exit('worker ' + os.environ['RANK'] + ' gave up: bad input')\n"
    )
    with pytest.raises(TorchrunError, match="(?s)exited with code 1.*worker 0 gave up") as error:
        run_torchrun(script, 1, [], timeout=60)
    assert error.value.returncode == 1
    assert "worker 0 gave up: bad input" in error.value.stderr
    assert "rank 0 says hello" in error.value.stdout


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


HANG_SCRIPT = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
print("waiting for a partner that never comes", file=sys.stderr, flush=True)
time.sleep(600)
"""


class _Interrupt(Exception):
    """Stands in for Jupyter's stop button (a KeyboardInterrupt would also stop pytest)."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupt


def _running(script: Path) -> list[int]:
    """Live processes whose command line names ``script`` (torchrun's agent and its workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _alive(int(proc.name)):
            try:
                if str(script).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # it ended while we looked
                pass
    return pids


def _wait_until_gone(script: Path) -> None:
    deadline = time.monotonic() + 60  # a bound against hanging, not a claim about speed
    while _running(script) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(script), f"processes of {script.name} survived: {_running(script)}"


@pytest.mark.slow
def test_run_torchrun_timeout_stops_every_worker(tmp_path):
    script, pid_file = tmp_path / "hangs.py", tmp_path / "worker.pid"
    script.write_text(HANG_SCRIPT)
    with pytest.raises(TorchrunError, match="did not finish within 10 s") as error:
        run_torchrun(script, 1, [str(pid_file)], timeout=10)
    assert error.value.returncode is None
    _wait_until_gone(script)  # whether or not the worker had started by then


def _interrupt_when_started(pid_file: Path) -> threading.Thread:
    """Sends SIGALRM to the main thread once the worker has written its pid (or after 120 s):
    the interrupt comes while the worker sleeps, however slowly the machine started it."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_interrupting_run_torchrun_stops_every_worker(tmp_path):
    script, pid_file = tmp_path / "hangs.py", tmp_path / "worker.pid"
    script.write_text(HANG_SCRIPT)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        watcher = _interrupt_when_started(pid_file)
        with pytest.raises(_Interrupt):
            run_torchrun(script, 1, [str(pid_file)], timeout=300)
        watcher.join()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert pid_file.exists()  # the worker was running when the interrupt came
    _wait_until_gone(script)


ADOPT_SCRIPT = """
import torch.distributed as dist
from labkit.train import all_reduce_mean, barrier, cleanup, init_distributed

dist.init_process_group("gloo")  # the caller's own group: labkit must use it, not replace it
info = init_distributed("cpu")
assert init_distributed("cpu") is info
barrier(info)
mean = all_reduce_mean(info.rank, info)
print(f"rank {info.rank} of {info.world_size} {info.backend}: mean {mean}")
cleanup(info)
assert dist.is_initialized(), "cleanup destroyed a group it did not create"
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_share_the_callers_group_and_average(tmp_path):
    script = tmp_path / "adopt.py"
    script.write_text(ADOPT_SCRIPT)
    result = run_torchrun(script, 2, [], timeout=60)
    assert "rank 0 of 2 gloo: mean 0.5" in result.stdout
    assert "rank 1 of 2 gloo: mean 0.5" in result.stdout


def _train_script() -> ModuleType:
    """tests/ddp_train_script.py as a module (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ddp_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Ignored targets dealt unevenly, and 2 micro-batches per step: each rank must divide its summed
# loss by the all-reduced count of the global batch (not by its own count), and the first
# backward of each step runs under DDP's no_sync. Timeouts are hang guards, generous under load.
TRAIN_ARGS = ["--ignore-fraction", "0.4", "--grad-accum", "2"]


def _rank_target_counts(script: ModuleType, steps: int = 5, batch_size: int = 8) -> list[list]:
    """Counted (not -100) targets per step on each of 2 ranks, as the Trainer deals them."""
    labels = script.make_data(0.4).tensors[1]
    counts = []
    for rank in (0, 1):
        sampler = DistributedSampler(
            labels, num_replicas=2, rank=rank, shuffle=True, seed=script.SEED, drop_last=True
        )
        order = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            order += list(sampler)
        per_step = batch_size // 2
        counts.append(
            [
                int((labels[order[i * per_step : (i + 1) * per_step]] != -100).sum())
                for i in range(steps)
            ]
        )
    return counts


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """The folder of one uninterrupted 2-process run of tests/ddp_train_script.py."""
    two = tmp_path_factory.mktemp("two_processes")
    run_torchrun(TRAIN_SCRIPT, 2, [str(two), *TRAIN_ARGS], timeout=300)
    return two


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, two_process_run):
    """THE test: the Trainer on 2 ranks with B/2 examples each ends with the weights of the
    Trainer on 1 process with all B, over 5 shuffled steps that cross an epoch boundary, with
    ignored targets that the ranks count differently and gradient accumulation."""
    script = _train_script()
    rank0_counts, rank1_counts = _rank_target_counts(script)
    assert rank0_counts != rank1_counts  # the shards differ: a per-rank denominator would show
    one, two = tmp_path / "one_process", two_process_run
    one.mkdir()
    subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), str(one), *TRAIN_ARGS],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip

    single = torch.load(one / "rank0.pt")
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert rank0["state_dict"].keys() == rank1["state_dict"].keys() == single["state_dict"].keys()
    for name, weight in rank0["state_dict"].items():
        assert torch.equal(weight, rank1["state_dict"][name]), f"ranks differ in {name}"
        torch.testing.assert_close(weight, single["state_dict"][name], rtol=0, atol=1e-6, msg=name)
    # Both ranks log the loss of the whole global batch, the loss the single process logs.
    assert rank0["losses"] == rank1["losses"]
    assert len(single["losses"]) == 5
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(single["losses"]))
    # The first of the 2 micro-batches of each of the 5 steps skipped the all-reduce.
    assert rank0["no_sync_calls"] == rank1["no_sync_calls"] == 5
    # Training moved the weights, so the agreement above is not that of untouched weights.
    initial = script.make_model().state_dict()
    assert not torch.equal(single["state_dict"]["head.weight"], initial["head.weight"])

    # Only rank 0 wrote a checkpoint, and it holds the final weights.
    assert not (two / "checkpoints_rank1").exists(), "rank 1 wrote checkpoint files"
    (checkpoint,) = (two / "checkpoints_rank0").iterdir()
    assert checkpoint.name == "step_0000005.pt"
    saved = torch.load(checkpoint, weights_only=True)["model"]
    for name, weight in rank0["state_dict"].items():
        assert torch.equal(saved[name], weight), f"checkpoint differs in {name}"


@pytest.mark.slow
def test_elastic_run_survives_a_killed_rank(tmp_path, two_process_run):
    """torchrun --max-restarts 1: rank 1 is SIGKILLed as step 3 begins; torchrun stops rank 0,
    starts both again, they resume from the step-2 checkpoint and end with exactly the
    weights and losses of the uninterrupted 2-process run."""
    args = [str(tmp_path), "--elastic", "--checkpoint-every", "1", *TRAIN_ARGS]
    result = run_torchrun(
        TRAIN_SCRIPT, 2, [*args, "--kill-rank", "1", "--kill-at-step", "3"], timeout=300,
        max_restarts=1,
    )  # fmt: skip
    for rank in (0, 1):  # the first attempt started afresh, the second from step 2
        assert f"rank {rank} attempt 0: resuming from None" in result.stdout
        assert f"rank {rank} attempt 1: resuming from {tmp_path}/checkpoints/step_0000002.pt" in (
            result.stdout
        )
    reference = torch.load(two_process_run / "rank0.pt")
    for rank in (0, 1):
        elastic = torch.load(tmp_path / f"rank{rank}.pt")
        assert elastic["losses"] == reference["losses"]
        for name, weight in reference["state_dict"].items():
            assert torch.equal(elastic["state_dict"][name], weight), f"rank {rank}: {name}"
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(saved) == [f"step_000000{t}.pt" for t in range(1, 6)]


def test_torchrun_command_makes_restarts_explicit():
    command = torchrun_command(TRAIN_SCRIPT, 2, [], max_restarts=1)
    assert command[3:7] == ["--standalone", "--nproc_per_node", "2", "--max_restarts"]
    with pytest.raises(ValueError, match="max_restarts must be an int >= 0, got -1"):
        torchrun_command(TRAIN_SCRIPT, 2, [], max_restarts=-1)


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: fewer than 2 GPUs"
)
def test_processes_on_gpus_train_like_one_gpu(tmp_path):
    """The same check on CUDA with NCCL, one rank per GPU (NCCL refuses two ranks on one GPU)."""
    n_gpus = torch.cuda.device_count()
    one, many = tmp_path / "one_gpu", tmp_path / "all_gpus"
    one.mkdir()
    many.mkdir()
    args = ["--device", "cuda", "--batch-size", str(4 * n_gpus)]
    subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), str(one), *args],
        check=True,
        timeout=120,
        capture_output=True,
    )
    run_torchrun(TRAIN_SCRIPT, n_gpus, [str(many), *args], timeout=180)
    single = torch.load(one / "rank0.pt", map_location="cpu")
    for rank in range(n_gpus):
        ranked = torch.load(many / f"rank{rank}.pt", map_location="cpu")
        for name, weight in ranked["state_dict"].items():
            torch.testing.assert_close(
                weight, single["state_dict"][name], rtol=0, atol=1e-6, msg=name
            )


# --- model parallelism: tensor parallelism and FSDP (labkit.train.parallel) ------------------

PARALLEL_SCRIPT = TESTS / "parallel_script.py"
# float64 on both sides: a correct split agrees to rounding; a wrong one (a missing all-reduce,
# a shard multiplied by the wrong rows) is off by O(0.1).
PARALLEL_TOL = 1e-10


def _check_parallel_run(results: dict, world: int) -> None:
    assert results["world_size"] == world
    for name in ("mlp", "swiglu", "attention"):
        split = results[name]
        assert split["output"] < PARALLEL_TOL, name
        assert split["input_grad"] < PARALLEL_TOL, name
        assert split["weight_grads"], name
        for weight, diff in split["weight_grads"].items():
            assert diff < PARALLEL_TOL, f"{name}.{weight}: {diff}"
    # The weights really were split: each rank holds 1/W of the hidden units / heads.
    assert results["mlp"]["shards"]["up_proj.weight"] == (32 // world, 16)
    assert results["mlp"]["shards"]["down_proj.weight"] == (16, 32 // world)
    assert results["attention"]["shards"]["q_proj.weight"] == (16 // world, 16)
    assert results["attention"]["shards"]["k_proj.weight"] == (8 // world, 16)  # 2 of 4 heads
    assert results["attention"]["shards"]["out_proj.weight"] == (16, 16 // world)

    fsdp = results["fsdp"]
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(fsdp["single_losses"]))
    assert len(fsdp["losses"]) == 3
    for weight, diff in fsdp["weights"].items():
        assert diff < PARALLEL_TOL, f"fsdp {weight}: {diff}"
    assert fsdp["moved"] > 1e-3  # training changed the weights, so agreeing means something

    memory = {name: sum(parts.values()) for name, parts in results["memory"].items()}
    assert memory["ddp"] == memory["single"]  # DDP: a full copy of everything on every rank
    assert results["memory"]["ddp"]["optimizer"] == 2 * results["memory"]["ddp"]["parameters"]
    # FSDP: about 1/W of it per rank (shards are padded to equal sizes, hence "about").
    assert memory["fsdp"] == pytest.approx(memory["ddp"] / world, rel=0.05)


@pytest.mark.slow
def test_tensor_parallel_and_fsdp_equal_one_process(tmp_path):
    """One 2-process gloo launch: the TP MLP (GELU, SwiGLU) and the head-split attention give
    the unsplit module's output and gradients; 3 FSDP steps of a tiny GPT end with the weights
    and losses of the same steps on one process; FSDP holds half of DDP's bytes per rank."""
    run_torchrun(PARALLEL_SCRIPT, 2, [str(tmp_path)], timeout=300)
    for rank in (0, 1):
        _check_parallel_run(torch.load(tmp_path / f"rank{rank}.pt"), world=2)


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: fewer than 2 GPUs"
)
def test_tensor_parallel_and_fsdp_on_gpus(tmp_path):
    """The same checks on CUDA with NCCL, on 2 GPUs (one rank per GPU)."""
    run_torchrun(PARALLEL_SCRIPT, 2, [str(tmp_path), "--device", "cuda"], timeout=180)
    for rank in (0, 1):
        _check_parallel_run(torch.load(tmp_path / f"rank{rank}.pt"), world=2)


def test_parallel_helpers_refuse_bad_input():
    from labkit.train.parallel import device_mesh, fully_shard_model, tensor_parallel_mlp

    with pytest.raises(ValueError, match="world of one; launch with torchrun"):
        device_mesh(SINGLE_PROCESS, "cpu")
    with pytest.raises(ValueError, match="mlp must be a labkit FeedForward, got Linear"):
        tensor_parallel_mlp(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="Linear has no .layers ModuleList; pass blocks="):
        fully_shard_model(nn.Linear(2, 2), None)
