"""Shared pytest fixtures.

Every test that takes the ``device`` fixture runs on the CPU and, when a CUDA GPU is present,
again on the GPU (reported as skipped otherwise), so the GPU path is tested wherever it exists.
"""

import os
from pathlib import Path

import pytest
import torch

# Debian's Chromium, which the browser tests drive (playwright never downloads one).
CHROMIUM = Path("/usr/bin/chromium")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Each test starts from the same random state, so a failure reproduces exactly."""
    torch.manual_seed(0)


def _peaked(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """The model with seeded N(0, std) weight matrices instead of the N(0, 0.02) init: sharp
    attention and peaked logits, so its tokens depend on every position and piece of context
    (a freshly initialised tiny model is nearly context-free: shifting the decode positions by
    one leaves its greedy tokens unchanged). Returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


@pytest.fixture
def peaked():
    """``peaked(model, std=0.3, seed=0)``: see ``_peaked``."""
    return _peaked


# The packaged pretrained models are loaded once per test session (SmolLM2's GGUF takes ~20 s
# to dequantize), each with its transformers reference model for equivalence checks.


@pytest.fixture
def close_figures():
    """Closes every matplotlib figure a test opened (figure tests: viz, explorer)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def tok():
    """A character tokenizer over a short text (letters, digits, punctuation of the tests)."""
    from labkit.data import CharTokenizer

    return CharTokenizer.from_corpus(["hello world, the cat sat on the mat. 0123456789-/"])


@pytest.fixture(scope="session")
def smollm2():
    """``labkit.models.Pretrained``: SmolLM2-135M-Instruct as labkit ``Llama`` + reference."""
    from labkit.models.pretrained import load

    return load("smollm2-135m-instruct", reference=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's Hugging Face tokenizer alone, read from the packaged GGUF (a few seconds; no
    model weights), as ``labkit.models.pretrained.load("smollm2-135m-instruct").tokenizer``."""
    from transformers import AutoTokenizer

    from labkit.models.pretrained import quiet_progress, smollm2_gguf

    gguf = smollm2_gguf()
    with quiet_progress():
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def minilm():
    """``labkit.models.Pretrained``: all-MiniLM-L6-v2 as labkit ``BertEncoder`` + reference."""
    from labkit.models.pretrained import load

    return load("minilm", reference=True)


# The book is rendered from the notebooks' executed copies that tests/test_notebooks.py leaves in
# build/executed/smoke/, so the `book` tests run after every other test and the `browser` tests
# (which open the rendered book) after those. The sort is stable: the order within each group
# stays as collected.


def pytest_collection_modifyitems(config, items) -> None:
    def stage(item) -> int:
        if item.get_closest_marker("browser"):
            return 2
        if item.get_closest_marker("book"):
            return 1
        return 0

    items.sort(key=stage)


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by playwright (never a downloaded browser).

    One for the whole session: the book's and JupyterLab's browser tests share it (a second
    ``sync_playwright()`` while the first is open fails with "Sync API inside the asyncio loop").
    """
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[book]')"
    if reason is None and not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()
