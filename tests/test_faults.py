"""Training that survives faults (issue 22): kills, Ctrl-C, SIGTERM, full disks, damaged files.

The CLI tests train one tiny character GPT (1 layer, 32 wide, 60 steps, dropout on, so the
RNG state matters) without interruption, then the same run killed, interrupted or starved of
disk space and resumed, and require the resumed run to end with *identical* weights,
optimizer state and history (CPU, fp32, one thread in every process).
"""

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from labkit.course.cli import main
from labkit.train import (
    CheckpointError,
    CheckpointWriteError,
    TrainConfig,
    Trainer,
    checkpoint_path,
    checkpoint_step,
    checkpoints,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from labkit.train.interrupts import TrainingInterrupted

STEPS = 60
CLOCK = ("time_s", "tokens_per_s")  # the only history columns allowed to differ


def _play(path: Path) -> Path:
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    speeches = [
        f"{'ROMEO' if i % 2 == 0 else 'JULIET'}:\n{' '.join(rng.choices(words, k=8))}.\n"
        for i in range(300)
    ]
    path.write_text("\n".join(speeches), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return _play(tmp_path_factory.mktemp("text") / "play.txt")


def run_flags(text: Path) -> list[str]:
    return [
        "--text", str(text), "--max-iters", str(STEPS), "--n-layer", "1", "--n-head", "2",
        "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--eval-interval", "10",
        "--eval-iters", "2", "--warmup-iters", "5", "--dropout", "0.1", "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float sums
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text) -> Path:
    """The uninterrupted run, trained in this process on one thread."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "char-gpt", *run_flags(text), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def assert_same_run(run: Path, reference: Path) -> None:
    """checkpoint.pt of both runs: the same weights, optimizer, schedule, RNG and history."""
    ours, theirs = (read_checkpoint(path / "checkpoint.pt") for path in (run, reference))
    assert ours["step"] == theirs["step"] == STEPS
    for key in ("model", "optimizer", "scheduler", "rng", "best_eval_loss", "best_step"):
        _same(ours[key], theirs[key], key)
    strip = [{k: v for k, v in record.items() if k not in CLOCK} for record in ours["history"]]
    same = [{k: v for k, v in record.items() if k not in CLOCK} for record in theirs["history"]]
    _same(strip, same, "history")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "labkit", "train", "char-gpt", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_checkpoint(process: subprocess.Popen, folder: Path, past: int) -> int:
    """Wait until ``folder`` holds a checkpoint after step ``past``; returns its step."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        latest = latest_checkpoint(folder)
        if latest is not None and checkpoint_step(latest) > past:
            return checkpoint_step(latest)
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint after step {past} in {folder}")


# --- kill, interrupt, resume -----------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_run(
    reference, text, tmp_path, one_thread
):
    """SIGKILL (no warning, no cleanup) at three random points, each time possibly in the middle
    of writing a checkpoint; each restart is `--resume` alone, so it also reads the run's own
    settings back. The end: bit-identical to the run that was never killed."""
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    out = tmp_path / "run"
    folder = out / "checkpoints"
    first = [*run_flags(text), "--out", str(out), "--checkpoint-every", "1"]
    again = ["--out", str(out), "--resume", "--checkpoint-every", "1", "--no-progress"]
    kills = sorted(rng.sample(range(3, STEPS - 20), 3))  # 20 steps left: killed before the end
    for i, target in enumerate(kills):
        process = subprocess.Popen(
            _cli(*(again if i else first)), env=ENV, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for_checkpoint(process, folder, target)
            time.sleep(rng.uniform(0, 0.005))
        finally:
            process.kill()
            process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL, f"random seed {seed}"
        assert not (out / "checkpoint.pt").exists()
    final = subprocess.run(_cli(*again), env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert "resumed from" in final.stdout and "Traceback" not in final.stderr
    assert_same_run(out, reference)
    assert len(list_checkpoints(folder)) <= 3  # --keep 2, plus the best by validation loss


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_boundary_and_resume_is_exact(reference, text, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        _cli(*run_flags(text), "--out", str(out)), env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_checkpoint(process, out / "checkpoints", 0)  # training is under way
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "SIGINT received: saving a checkpoint when step" in err
    assert "press Ctrl-C again to stop at once" in err
    match = re.search(r"labkit: SIGINT: stopped after step (\d+); saved (\S+)", err)
    assert match, err
    step = int(match.group(1))
    assert 10 <= step < STEPS
    assert f"saving a checkpoint when step {step} ends" in err  # the step it let finish
    assert Path(match.group(2)) == checkpoint_path(out / "checkpoints", step)
    assert f"resume with: labkit train char-gpt --out {out} --resume" in err

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "char-gpt", "--out", str(out), "--resume", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_run(out, reference)


def test_resume_refuses_settings_that_change_the_result(reference, tmp_path, text, capsys):
    run = shutil.copytree(reference, tmp_path / "run")
    cases = [
        (["--lr", "0.002"], "--lr 0.001 but this run has --lr 0.002"),
        (["--n-embd", "64"], "--n-embd 32 but this run has --n-embd 64"),
        (["--seed", "1"], "--seed 1337 but this run has --seed 1"),
        (["--dtype", "bf16"], "--dtype fp32 but this run has --dtype bf16"),
        (["--text", str(_play_other(tmp_path))], "the text is not the one it was trained on"),
    ]
    for flags, message in cases:
        assert main(["train", "char-gpt", "--out", str(run), "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("labkit: error: cannot resume the run in") and message in err, err
        assert len(err.strip().splitlines()) == 1
    # Without --resume the folder is not silently mixed with a new run.
    assert main(["train", "char-gpt", *run_flags(text), "--out", str(run)]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    empty = tmp_path / "empty"
    assert main(["train", "char-gpt", "--out", str(empty), "--resume"]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err


def _play_other(tmp_path: Path) -> Path:
    path = tmp_path / "other.txt"
    path.write_text(_play(tmp_path / "x.txt").read_text().replace("ROMEO", "HAMLET"))
    return path


# --- the Trainer: signals, keep + best, full disk ------------------------------------------------

N, D, C = 24, 8, 3


def _tiny_run(
    folder: Path, signals: dict[int, list[int]] | None = None, **overrides
) -> tuple[Trainer, list]:
    """A linear classifier with dropout; ``signals``: {step: [signals sent during it]}."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.2), nn.Linear(D, C))
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(N, D, generator=generator), torch.randint(0, C, (N,)))
    settings = dict(
        max_steps=6, batch_size=8, lr=0.1, device="cpu", progress=False, seed=0,
        checkpoint_dir=folder, checkpoint_every=1,
    )  # fmt: skip
    settings.update(overrides)
    config = TrainConfig(**settings)
    trainer = Trainer(model, config, data, data if config.eval_every else None)
    sent, signalled = [], set()
    take_step = trainer._train_step

    def step() -> dict:
        n = trainer.step + 1
        if n in (signals or {}) and n not in signalled:
            signalled.add(n)
            for signum in signals[n]:
                sent.append(signum)
                os.kill(os.getpid(), signum)  # the handler runs at once, as the step begins
        return take_step()

    trainer._train_step = step
    return trainer, sent


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint(tmp_path):
    full, _ = _tiny_run(tmp_path / "full")
    full.fit()
    handler = signal.getsignal(signal.SIGTERM)
    trainer, _ = _tiny_run(tmp_path / "run", {3: [signal.SIGTERM]})
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit()
    assert (stop.value.step, stop.value.signal_name, stop.value.exit_code) == (3, "SIGTERM", 143)
    assert stop.value.checkpoint == checkpoint_path(tmp_path / "run", 3)
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    resumed, _ = _tiny_run(tmp_path / "run")
    resumed.fit(resume_from=latest_checkpoint(tmp_path / "run"))
    assert torch.equal(resumed.model[1].weight, full.model[1].weight)


def test_trainer_resume_names_what_differs_or_is_foreign(tmp_path):
    trainer, _ = _tiny_run(tmp_path, max_steps=2)
    trainer.fit()
    saved = checkpoint_path(tmp_path, 2)
    other, _ = _tiny_run(tmp_path / "other", max_steps=2, lr=0.05)
    with pytest.raises(CheckpointError, match=r"TrainConfig.lr=0.1 but this Trainer has lr=0.05"):
        other.resume(saved)
    other.resume(saved, strict=False)  # e.g. to go on with another setting, knowingly
    assert other.step == 2
    bare = tmp_path / "bare.pt"
    torch.save(nn.Linear(D, C).state_dict(), bare)
    with pytest.raises(CheckpointError, match="is a bare state_dict .load it with model.load"):
        other.resume(bare)
    torch.save({"step": 1}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of labkit's Trainer .no epoch"):
        other.resume(tmp_path / "partial.pt")


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    trainer, sent = _tiny_run(tmp_path, {3: [signal.SIGINT, signal.SIGINT]})
    with pytest.raises(KeyboardInterrupt) as stop:
        trainer.fit()
    assert not isinstance(stop.value, TrainingInterrupted)
    assert len(sent) == 2 and trainer.step == 2  # step 3 never finished
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 2
    assert signal.getsignal(signal.SIGINT) is handler
    trainer.fit()  # and the run can go on
    assert trainer.step == 6


def test_keep_k_newest_checkpoints_and_the_best(tmp_path):
    trainer, _ = _tiny_run(tmp_path, keep_checkpoints=2, eval_every=1)
    losses = iter([3.0, 1.0, 2.0, 4.0, 5.0, 6.0])
    trainer.evaluate = lambda: {"loss": next(losses)}
    trainer.fit()
    assert trainer.best_step == 2
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 5, 6]
    (tmp_path / "step_0000007.pt.partial").write_bytes(b"half")  # a write cut short
    assert prune_checkpoints(tmp_path, keep=1) == [tmp_path / f"step_000000{t}.pt" for t in (2, 5)]
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000006.pt"]


@pytest.fixture
def full_disk(monkeypatch):
    """While ``full_disk["on"]``, every checkpoint write stops half-way with ENOSPC."""
    state = {"on": False, "failures": 0}
    write = checkpoints._write

    def filling_write(fd: int, data: memoryview) -> int:
        if state["on"]:
            write(fd, data[: len(data) // 2])
            state["failures"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(checkpoints, "_write", filling_write)
    return state


def _fill_disk_during(trainer: Trainer, state: dict, steps: range) -> None:
    take_step = trainer._train_step

    def step() -> dict:
        state["on"] = trainer.step + 1 in steps
        return take_step()

    trainer._train_step = step


def test_full_disk_stops_and_keeps_the_previous_checkpoint(tmp_path, full_disk):
    trainer, _ = _tiny_run(tmp_path)
    _fill_disk_during(trainer, full_disk, range(3, 5))
    with pytest.raises(CheckpointWriteError, match="No space left on device") as error:
        trainer.fit()
    assert str(error.value) == (
        f"could not write checkpoint '{tmp_path / 'step_0000003.pt'}': No space left on "
        "device; the previous checkpoint is intact; free some disk space"
    )
    assert full_disk["failures"] == 1 and trainer.step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001.pt", "step_0000002.pt"]
    assert read_checkpoint(tmp_path / "step_0000002.pt")["step"] == 2  # intact


def test_full_disk_can_be_trained_through(tmp_path, full_disk, caplog):
    full, _ = _tiny_run(tmp_path / "full")
    full.fit()
    trainer, _ = _tiny_run(tmp_path / "run", on_checkpoint_error="continue")
    _fill_disk_during(trainer, full_disk, range(3, 5))
    trainer.fit()
    assert full_disk["failures"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "No space left on device" in warnings[0]
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "run")] == [1, 2, 5, 6]
    assert not list((tmp_path / "run").glob("*.partial"))
    assert torch.equal(trainer.model[1].weight, full.model[1].weight)


def test_full_disk_in_the_cli_then_resume(reference, text, tmp_path, full_disk, capsys, one_thread):
    """The disk fills up as the step-20 checkpoint is written: one clear line, exit 1, the
    step-10 checkpoint intact; with space again, --resume ends as the uninterrupted run."""
    out = tmp_path / "run"
    real_fit = Trainer.fit

    def fit(trainer: Trainer, resume_from=None):
        _fill_disk_during(trainer, full_disk, range(20, STEPS + 1))
        return real_fit(trainer, resume_from)

    Trainer.fit = fit
    try:
        assert main(["train", "char-gpt", *run_flags(text), "--out", str(out)]) == 1
    finally:
        Trainer.fit = real_fit
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"labkit: error: could not write checkpoint '{out / 'checkpoints' / 'step_0000020.pt'}'"
        ": No space left on device; the previous checkpoint is intact; free some disk space; "
        f"then resume with: labkit train char-gpt --out {out} --resume"
    )
    assert [checkpoint_step(p) for p in list_checkpoints(out / "checkpoints")] == [10]
    full_disk["on"] = False
    assert main(["train", "char-gpt", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_run(out, reference)


# --- damaged and foreign files ------------------------------------------------------------------


def test_checksum_catches_what_torch_load_would_miss(tmp_path):
    path = write_checkpoint({"w": torch.arange(1000.0)}, tmp_path / "step_0000001.pt")
    data = bytearray(path.read_bytes())
    offset = data.find(torch.arange(1000.0).numpy().tobytes()[400:408])  # inside the tensor
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged .its checksum does not match"):
        read_checkpoint(path)
    # A plain torch.save file (no checksum) still loads.
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(read_checkpoint(tmp_path / "plain.pt")["w"], torch.ones(2))


def _damaged_versions(
    data: bytes, rng: random.Random, n_cut: int, n_flip: int, tail: int = 8
) -> list[tuple[int, bytes]]:
    """(offset, damaged data): ``data`` cut at ``n_cut`` offsets and with one bit flipped at
    ``n_flip`` offsets, the first 8 and last ``tail`` bytes (a zip's directory end and labkit's
    checksum) among them."""
    size = len(data)
    cuts = sorted({0, 1, size - 1, *rng.sample(range(size), min(n_cut, size))})
    edges = [*range(min(8, size)), *range(max(size - tail, 0), size)]
    flips = sorted(set(edges) | set(rng.sample(range(size), min(n_flip, size))))
    versions = [(cut, data[:cut]) for cut in cuts]
    for offset in flips:
        flipped = bytearray(data)
        flipped[offset] ^= 1 << rng.randrange(8)
        versions.append((offset, bytes(flipped)))
    return versions


def _one_clear_line(err: str, name: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labkit: error:"), err
    assert name in lines[0], err


@pytest.fixture(scope="module")
def other_size(tmp_path_factory, text) -> Path:
    """A run of another model size (n_embd 16), for foreign checkpoints."""
    out = tmp_path_factory.mktemp("other") / "run"
    flags = [*run_flags(text), "--n-embd", "16", "--max-iters", "2", "--warmup-iters", "1"]
    assert main(["train", "char-gpt", *flags, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_fuzzed_run_files_load_cleanly_or_give_one_clear_line(
    reference, other_size, tmp_path, capsys
):
    """Every truncation and flipped byte of checkpoint.pt, config.json and tokenizer.json, and
    foreign files in their place: `labkit sample` either works or prints one line naming the
    file, never a traceback from torch, json or zipfile."""
    rng = random.Random(22)
    run = shutil.copytree(reference, tmp_path / "run")
    sample = ["sample", "--out", str(run), "--max-new-tokens", "3", "--device", "cpu"]
    bare = tmp_path / "bare.pt"
    torch.save(nn.Linear(2, 2).state_dict(), bare)
    foreign = {
        "checkpoint.pt": [b"", b"not a checkpoint", bare.read_bytes(),
                          (other_size / "checkpoint.pt").read_bytes()],
        "config.json": [b"", b"[]", b'{"format": "labkit.char-gpt"}',
                        (other_size / "config.json").read_bytes()],
        "tokenizer.json": [b"", b'{"format": "labkit.CharTokenizer", "chars": 5}',
                           b'{"format": "labkit.CharTokenizer", "chars": ["a", "b"]}'],
    }  # fmt: skip
    budget = {  # cuts, flips, flips among the last bytes
        "checkpoint.pt": (20, 60, 100),
        "config.json": (15, 50, 8),
        "tokenizer.json": (10, 30, 8),
    }
    outcomes, checked = {}, len((run / "checkpoint.pt").read_bytes()) - 100
    for name, (n_cut, n_flip, tail) in budget.items():
        original = (run / name).read_bytes()
        for data in foreign[name]:
            (run / name).write_bytes(data)
            assert main(sample) == 2, name
            _one_clear_line(capsys.readouterr().err, name)
        clean = errors = 0
        for offset, data in _damaged_versions(original, rng, n_cut, n_flip, tail):
            (run / name).write_bytes(data)
            code = main(sample)
            captured = capsys.readouterr()
            if code == 0:
                clean += 1
                assert captured.out.startswith("\n")  # the default prompt, continued
                # Damage before the zip's last 100 bytes (directory end + checksum) is caught.
                assert name != "checkpoint.pt" or offset >= checked, offset
            else:
                assert code == 2
                _one_clear_line(captured.err, name)
                errors += 1
        (run / name).write_bytes(original)
        outcomes[name] = (clean, errors)
    print(outcomes)
    assert main(sample) == 0


@pytest.mark.slow
def test_fuzzed_checkpoint_on_resume_gives_one_clear_line(reference, tmp_path, capsys, one_thread):
    """`--resume` reads the newest step checkpoint: damaged, it is one line naming it (and the
    checkpoint to fall back on), never a traceback."""
    rng = random.Random(23)
    run = shutil.copytree(reference, tmp_path / "run")
    latest = latest_checkpoint(run / "checkpoints")
    original = latest.read_bytes()
    resume = ["train", "char-gpt", "--out", str(run), "--resume", "--no-progress"]
    for _, data in _damaged_versions(original, rng, 10, 30, 30):
        latest.write_bytes(data)
        code = main(resume)
        captured = capsys.readouterr()
        if code != 0:
            assert code == 2
            _one_clear_line(captured.err, latest.name)
    latest.write_bytes(b"")
    assert main(resume) == 2
    err = capsys.readouterr().err
    _one_clear_line(err, latest.name)
    assert "is empty" in err and "delete it to resume from step_" in err
