import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit.course.cli import main


def test_demo_passes_every_check(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "All checks passed." in out
    assert "FAIL" not in out
    assert out.count("[PASS]") >= 6


def test_info_names_the_device(capsys):
    assert main(["info"]) == 0
    assert "default device:" in capsys.readouterr().out


def test_bad_device_is_one_clear_line():
    result = subprocess.run(
        [sys.executable, "-m", "labkit", "demo", "--device", "tpu"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("labkit: error:") and "'tpu'" in result.stderr
    assert "Traceback" not in result.stderr


def _notebook(path, code: str) -> None:
    """A minimal course-style notebook: a parameters cell, then ``code``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("SMOKE = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Py 3"}
    nbformat.write(nb, path)


def test_notebooks_run_passes_the_mode_and_keeps_executed_copies(tmp_path, capsys):
    _notebook(tmp_path / "01_mode.ipynb", "assert SMOKE is False, 'full mode expected'")
    _notebook(tmp_path / "02_other.ipynb", "x = 1")
    out = tmp_path / "out"
    assert main(["notebooks", "run", "--dir", str(tmp_path), "--out", str(out), "01"]) == 0
    assert (out / "01_mode.ipynb").exists() and not (out / "02_other.ipynb").exists()
    assert "01_mode.ipynb" in capsys.readouterr().out
    # The same notebook fails in smoke mode, and the report names the cell and its source.
    assert main(["notebooks", "run", "--smoke", "--dir", str(tmp_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "FAILED 01_mode.ipynb" in err and "full mode expected" in err
    assert "assert SMOKE is False" in err


def test_notebooks_run_unknown_name_is_one_clear_line(tmp_path, capsys):
    _notebook(tmp_path / "01_mode.ipynb", "x = 1")
    assert main(["notebooks", "run", "--dir", str(tmp_path), "07"]) == 2
    err = capsys.readouterr().err
    assert "no notebook '07'" in err and "01_mode" in err


def test_exercises_writes_starters_without_solutions(tmp_path, capsys):
    import nbformat

    source = Path(__file__).resolve().parents[1] / "notebooks" / "exercises"
    assert main(["exercises", "--dir", str(source), "--out", str(tmp_path)]) == 0
    written = sorted(tmp_path.glob("ex_*.ipynb"))
    assert [p.name for p in written] == sorted(p.name for p in source.glob("ex_*.ipynb"))
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    for path in written:
        cells = nbformat.read(path, as_version=4).cells
        assert not [c for c in cells if "solution" in c.metadata.get("tags", [])], path.name
        assert [c for c in cells if "check" in c.metadata.get("tags", [])], path.name


def test_exercises_into_their_own_folder_is_one_clear_line(capsys):
    source = Path(__file__).resolve().parents[1] / "notebooks" / "exercises"
    assert main(["exercises", "--dir", str(source), "--out", str(source)]) == 2
    assert capsys.readouterr().err.startswith("labkit: error:")


# ---------------------------------------------------------------------------------------------
# labkit train char-gpt / labkit sample
# ---------------------------------------------------------------------------------------------

TINY_RUN = [
    "--max-iters", "20", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
    "--block-size", "16", "--batch-size", "4", "--eval-interval", "10", "--warmup-iters", "5",
]  # fmt: skip
FINAL = re.compile(r"final \(step 20.*\): train loss ([\d.]+), val loss ([\d.]+)")
START = re.compile(r"step 0: train loss ([\d.]+), val loss ([\d.]+)")


def _play(path: Path) -> Path:
    """A 15 kB two-speaker play over a 31-character alphabet: easy to start learning."""
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    speeches = [
        f"{'ROMEO' if i % 2 == 0 else 'JULIET'}:\n{' '.join(rng.choices(words, k=8))}.\n"
        for i in range(300)
    ]
    path.write_text("\n".join(speeches), encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core machine run far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(text, run dir, stdout) of one tiny run through the installed ``labkit`` script."""
    folder = tmp_path_factory.mktemp("char_gpt")
    text, out = _play(folder / "play.txt"), folder / "run"
    script = Path(sys.executable).with_name("labkit")
    flags = ["--text", str(text), *TINY_RUN, "--device", "cpu", "--out", str(out)]
    result = subprocess.run(
        [str(script), "train", "char-gpt", *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return text, out, result.stdout


def test_console_script_trains_and_saves_a_run(char_run):
    _, out, stdout = char_run
    start = [float(v) for v in START.search(stdout).groups()]
    final = [float(v) for v in FINAL.search(stdout).groups()]
    assert start[1] == pytest.approx(math.log(35), abs=0.1)  # 31 characters + 4 special: uniform
    assert final[0] < start[0] - 0.2 and final[1] < start[1] - 0.2
    assert re.search(r"[\d,]+ tokens/s .* wall time [\d.]+ s", stdout)
    assert {"checkpoint.pt", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    run = json.loads((out / "config.json").read_text())
    assert run["model"]["n_layers"] == 1 and run["model"]["max_len"] == 16
    assert run["results"]["val_loss"] == pytest.approx(final[1], abs=1e-4)
    # The Trainer's own last evaluation saw the same validation windows as the final estimate.
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 20
    assert state["history"][-1]["eval_loss"] == pytest.approx(final[1], abs=1e-4)
    # The first step (compiling, with --compile) is reported apart from the steady speed.
    tokens = 4 * 16  # TINY_RUN: batch 4 x block 16 characters per step
    step_s = [tokens / record["tokens_per_s"] for record in state["history"]]
    assert run["results"]["first_step_s"] == pytest.approx(step_s[0], rel=1e-6)
    steady = tokens * 19 / sum(step_s[1:])
    assert run["results"]["tokens_per_s"] == pytest.approx(steady, rel=1e-6)


def test_main_in_process_repeats_the_console_script_run(
    char_run, tmp_path, capsys, one_thread, device
):
    text, _, stdout = char_run
    args = ["train", "char-gpt", "--text", str(text), *TINY_RUN, "--no-progress"]
    assert main([*args, "--device", str(device), "--dtype", "fp32", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "training:" not in captured.err  # --no-progress
    ours = [float(v) for v in FINAL.search(captured.out).groups()]
    script = [float(v) for v in FINAL.search(stdout).groups()]
    # Same seed, same data order: the same run (to the printed digit on the CPU).
    assert ours == pytest.approx(script, abs=0 if device.type == "cpu" else 2e-3)


def test_char_gpt_help_shows_the_nanogpt_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "char-gpt", "--help"])
    assert exit_info.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--n-layer", 4), ("--n-embd", 128), ("--max-iters", 2000)]:
        assert re.search(rf"{flag} [A-Z_]+ [^(]*\(default: {default}\)", usage), flag
    assert "(default: 0.001)" in usage and "(default: 0.0001)" in usage  # lr, min_lr


def test_building_the_parser_does_not_import_torch():
    code = (
        "import sys, labkit.course.cli; labkit.course.cli.build_parser(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_sample_continues_the_prompt_with_the_requested_characters(char_run, capsys, device):
    text, out, _ = char_run
    alphabet = set(text.read_text())
    args = ["sample", "--out", str(out), "--prompt", "ROMEO:", "--device", str(device)]
    samples = []
    for seed in ("3", "3", "4"):  # 40 characters from a 16-position model: several windows
        assert main([*args, "--max-new-tokens", "40", "--seed", seed]) == 0
        samples.append(capsys.readouterr().out)
    for sample in samples:
        assert sample.startswith("ROMEO:") and sample.endswith("\n")
        new = sample[len("ROMEO:") : -1]
        assert len(new) == 40 and set(new) <= alphabet  # no special tokens, no <unk>
    assert samples[0] == samples[1] != samples[2]
    assert main([*args, "--prompt", "ROMEO@"]) == 2
    assert "prompt characters ['@'] are not in the model's vocabulary" in capsys.readouterr().err


def test_char_gpt_bad_flags_are_one_clear_line(tmp_path, capsys):
    base = ["train", "char-gpt", "--out", str(tmp_path / "never")]
    assert main([*base, "--n-embd", "30", "--n-head", "4"]) == 2
    assert "n_embd=30 must be divisible by n_head=4" in capsys.readouterr().err
    assert main([*base, "--block-size", "0"]) == 2
    assert "block_size must be an int >= 1, got block_size=0" in capsys.readouterr().err
    assert main([*base, "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt' does not exist" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be " * 5)
    assert main([*base, "--text", str(short)]) == 2  # 95 characters, block_size 64
    assert "validation split has 10 characters" in capsys.readouterr().err
    assert main(["sample", "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labkit: error:") and "nothing' holds no trained char-GPT or BPE" in err
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage line + message
        main([*base, "--n-layer", "two"])
    assert exit_info.value.code == 2
    assert "--n-layer: invalid int value: 'two'" in capsys.readouterr().err


def test_char_windows_pair_each_window_with_the_next_characters():
    from labkit.course.chargpt import CharWindows

    ids = torch.arange(10)
    windows = CharWindows(ids, block_size=4)
    assert len(windows) == 6  # starts 0..5: the last window's target ends at ids[9]
    x, y = windows[5]
    assert x.tolist() == [5, 6, 7, 8] and y.tolist() == [6, 7, 8, 9]
    sample = CharWindows.random(ids, 4, n=50, generator=torch.Generator().manual_seed(0))
    starts = [int(sample[i][0][0]) for i in range(len(sample))]
    assert len(starts) == 50 and min(starts) >= 0 and max(starts) <= 5
    with pytest.raises(ValueError, match="longer than block_size=10"):
        CharWindows(ids, block_size=10)


def test_default_text_is_labkits_tiny_shakespeare():
    from labkit.course.chargpt import load_text
    from labkit.data.corpora import TINY_WORKS

    text = load_text()  # what `labkit train char-gpt` trains on without --text
    assert len(text) == 993_249 + 2 * (len(TINY_WORKS) - 1)  # the works, joined by blank lines
    assert text.startswith("ANTONY AND CLEOPATRA") and "ROMEO" in text


# ---------------------------------------------------------------------------------------------
# labkit train bpe-gpt: the same recipe on byte-level BPE tokens
# ---------------------------------------------------------------------------------------------

BPE_RUN = [*TINY_RUN, "--vocab-size", "300", "--eval-iters", "2", "--no-progress"]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(text, run dir, stdout) of one tiny bpe-gpt run (one thread: far faster when busy)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("bpe_gpt")
    text, out = _play(folder / "play.txt"), folder / "run"
    stdout, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout):
            flags = ["--text", str(text), *BPE_RUN, "--device", "cpu", "--out", str(out)]
            assert main(["train", "bpe-gpt", *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    return text, out, stdout.getvalue()


def test_bpe_gpt_trains_on_a_bpe_of_the_training_split(bpe_run):
    from labkit.course.chargpt import VAL_FRACTION, CharWindows, load_run
    from labkit.data import ByteLevelBPE

    text_path, out, stdout = bpe_run
    start = [float(v) for v in START.search(stdout).groups()]
    final = [float(v) for v in FINAL.search(stdout).groups()]
    assert start[1] == pytest.approx(math.log(300), abs=0.1)  # 300 ids, uniform at first
    assert final[0] < start[0] - 0.2 and final[1] < start[1] - 0.2
    assert {"checkpoint.pt", "config.json", "tokenizer"} <= {p.name for p in out.iterdir()}
    model, tokenizer, run = load_run(out, "cpu")
    assert run["format"] == "labkit.bpe-gpt" and run["settings"]["vocab_size"] == 300
    # The tokenizer is the BPE of the first 90% of the characters: the held-out text is unseen.
    text = text_path.read_text()
    cut = int(len(text) * (1 - VAL_FRACTION))
    assert tokenizer.merges == ByteLevelBPE.train(text[:cut], 300).merges
    assert tokenizer.merges != ByteLevelBPE.train(text, 300).merges
    # Bits per character, recomputed independently: log2-probabilities of the validation
    # windows' targets (drawn as the run drew them: the train windows first) over the
    # characters those targets spell.
    val_ids = torch.tensor(tokenizer.encode(text[cut:]))
    train_ids = torch.tensor(tokenizer.encode(text[:cut]))
    generator = torch.Generator().manual_seed(run["settings"]["seed"])
    n = 2 * 4  # eval_iters x batch_size
    CharWindows.random(train_ids, 16, n, generator)
    x, y = zip(*CharWindows.random(val_ids, 16, n, generator), strict=True)
    with torch.no_grad():
        logp = model(torch.stack(x)).logits.double().log_softmax(-1)  # (n, 16, V)
    bits = -logp.gather(-1, torch.stack(y)[..., None]).sum().item() / math.log(2)
    characters = sum(len(tokenizer.decode(t.tolist())) for t in y)
    assert run["results"]["val_loss"] == pytest.approx(final[1], abs=1e-4)
    assert run["results"]["val_bits_per_char"] == pytest.approx(bits / characters, rel=1e-4)
    assert f"({run['results']['val_bits_per_char']:.4f} bits per character)" in stdout


def test_bpe_gpt_resumes_where_the_run_would_have_ended(bpe_run, tmp_path, capsys, one_thread):
    import shutil

    _, reference, stdout = bpe_run
    run = shutil.copytree(reference, tmp_path / "run")
    (run / "checkpoint.pt").unlink()
    (run / "checkpoints" / "step_0000020.pt").unlink()  # as if stopped after step 10
    assert main(["train", "bpe-gpt", "--out", str(run), "--resume", "--no-progress"]) == 0
    resumed = capsys.readouterr().out
    assert "resumed from" in resumed and "step 10 of 20" in resumed
    assert FINAL.search(resumed).groups() == FINAL.search(stdout).groups()
    assert main(["train", "bpe-gpt", "--out", str(run), "--resume", "--vocab-size", "320"]) == 2
    assert "--vocab-size 300 but this run has --vocab-size 320" in capsys.readouterr().err


def test_bpe_gpt_samples_any_prompt_and_names_a_damaged_tokenizer(bpe_run, tmp_path, capsys):
    import shutil

    _, out, _ = bpe_run
    args = ["sample", "--out", str(out), "--max-new-tokens", "20", "--device", "cpu"]
    samples = []
    for prompt, seed in (("ROMEO:", "3"), ("ROMEO:", "3"), ("ROMEO:", "4"), ("Romeo @", "3")):
        assert main([*args, "--prompt", prompt, "--seed", seed]) == 0  # '@' is a byte: fine
        samples.append(capsys.readouterr().out)
    assert all(s.startswith("ROMEO:") for s in samples[:3]) and samples[3].startswith("Romeo @")
    assert samples[0] == samples[1] != samples[2]
    damaged = shutil.copytree(out, tmp_path / "run")
    (damaged / "tokenizer" / "merges.txt").write_text("#version: 0.2\nab\n")
    assert main([*args[:1], "--out", str(damaged), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labkit: error:") and "tokenizer" in err and len(err.splitlines()) == 1


def test_bpe_gpt_help_and_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "bpe-gpt", "--help"])
    assert exit_info.value.code == 0  # --help is not an error
    usage = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--vocab-size [A-Z_]+ [^(]*\(default: 2048\)", usage)
    assert re.search(r"--max-iters [A-Z_]+ [^(]*\(default: 2000\)", usage)  # char-gpt's
    assert "complete works" in usage
    base = ["train", "bpe-gpt", "--out", str(tmp_path / "never")]
    assert main([*base, "--vocab-size", "100"]) == 2
    assert "vocab_size must be an int >= 256" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
