"""labkit.models.pretrained's loaders stay quiet: no tqdm bar (a dead widget in the static book)."""

from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from labkit.models.pretrained import quiet_progress


def test_quiet_progress_disables_every_bar_and_restores_them():
    original = gguf_utils.tqdm
    hf_logging.enable_progress_bar()
    with quiet_progress():
        assert not hf_logging.is_progress_bar_enabled()
        bar = gguf_utils.tqdm(range(3), desc="dequantizing")
        assert bar.disable  # the GGUF dequantizer's bar draws nothing
        assert list(bar) == [0, 1, 2]  # and still iterates
    assert gguf_utils.tqdm is original
    assert hf_logging.is_progress_bar_enabled()


def test_quiet_progress_restores_on_error():
    original = gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    try:
        with quiet_progress():
            raise RuntimeError("checkpoint unreadable")
    except RuntimeError:
        pass
    assert gguf_utils.tqdm is original
    assert not hf_logging.is_progress_bar_enabled()  # it was off before: stays off
    hf_logging.enable_progress_bar()
