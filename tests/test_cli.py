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
