import subprocess
import sys

from labkit.cli import main


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
