import random

import numpy as np
import pytest
import torch

from labkit.device import (
    autocast,
    autocast_dtype,
    autocast_policy,
    bf16_hardware,
    get_device,
    seed_everything,
)


def test_auto_prefers_cuda_then_mps_then_cpu():
    device = get_device("auto")
    if torch.cuda.is_available():
        assert device.type == "cuda"
    elif torch.backends.mps.is_available():
        assert device.type == "mps"
    else:
        assert device == torch.device("cpu")


def test_explicit_cpu_and_device_objects():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    assert get_device(" CPU ") == torch.device("cpu")


def test_unknown_device_name_is_rejected():
    with pytest.raises(ValueError, match="'tpu'"):
        get_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        get_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_index_out_of_range():
    with pytest.raises(ValueError, match="CUDA device"):
        get_device(f"cuda:{torch.cuda.device_count()}")


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    seed_everything(123)
    first = draw()
    seed_everything(123)
    second = draw()
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])
    seed_everything(124)
    assert not torch.equal(draw()[2], first[2])


def test_seed_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="-1"):
        seed_everything(-1)


def test_autocast_dtype_per_device():
    assert autocast_dtype("cpu") is torch.bfloat16
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert autocast_dtype("cuda") is expected


def test_autocast_runs_matmul_in_low_precision(device):
    a = torch.randn(4, 4, device=device)
    with autocast(device):
        inside = a @ a
    with autocast(device, enabled=False):
        outside = a @ a
    assert inside.dtype == autocast_dtype(device)
    assert outside.dtype == torch.float32


def test_bf16_hardware_reads_cpu_flags(tmp_path):
    with_amx = tmp_path / "amx"
    with_amx.write_text("model name\t: Some Xeon\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("model name\t: Some Ryzen\nflags\t\t: fpu sse2 avx2\n")
    found = bf16_hardware("cpu", cpuinfo=with_amx)
    assert found.units is True and found.name == "Some Xeon" and "amx_bf16" in found.detail
    missing = bf16_hardware("cpu", cpuinfo=without)
    assert missing.units is False and missing.name == "Some Ryzen"
    unknown = bf16_hardware("cpu", cpuinfo=tmp_path / "absent")
    assert unknown.units is None and "not readable" in unknown.detail


def test_autocast_policy_on_cpu_is_measured():
    policy = autocast_policy("cpu")
    assert policy["matmul (linear layers, attention scores)"] == "low precision"
    assert policy["cross_entropy (the loss)"] == "float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the verdict agrees with a direct probe
        softmax_out = torch.softmax(torch.randn(2, 3).bfloat16(), -1).dtype
    expected = "float32" if softmax_out == torch.float32 else "follows its input"
    assert policy["softmax"] == expected
