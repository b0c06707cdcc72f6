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


def test_smollm2_second_load_reads_the_float32_cache_and_equals_the_gguf(tmp_path, monkeypatch):
    """The first load dequantizes the GGUF file and saves the float32 checkpoint; the second reads
    that copy (not the GGUF file) and gives the same weights, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    from labkit.models.pretrained import dequantized_cache, load_smollm2, smollm2_gguf

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    first = load_smollm2()
    folder = dequantized_cache(smollm2_gguf())
    assert folder.parent == tmp_path and (folder / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no half-written copy left

    sources = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, source, *args, **kwargs):
        sources.append((source, kwargs.get("gguf_file")))
        return original(cls, source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    second = load_smollm2()
    assert sources == [(folder, None)]

    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        assert torch.equal(a[name], b[name]), name
    text = "To be, or not to be: that is the question.\n"
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids
    chat = [{"role": "user", "content": text}]
    assert first.tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    ) == second.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (first.tokenizer.eos_token_id, first.tokenizer.bos_token_id) == (
        second.tokenizer.eos_token_id,
        second.tokenizer.bos_token_id,
    )


def test_an_unwritable_cache_is_skipped(tmp_path):
    from labkit.models.pretrained import save_atomically

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    save_atomically(None, None, blocker / "cache" / "smollm2")  # mkdir fails: no error, no copy
    assert not (blocker.parent / "cache").exists()
