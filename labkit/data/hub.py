"""The Hugging Face Hub, opt-in: SST-2 or IMDb with ``load_hub_dataset`` (needs network), and
``hub_unreachable``, the one probe that says why the Hub cannot be used right now (offline
variables, ``HF_ENDPOINT``'s host not answering within a bounded time, DNS included).
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from datasets import DatasetDict, load_dataset

HUB_DATASETS = {"sst2": "stanfordnlp/sst2", "imdb": "stanfordnlp/imdb"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_unreachable(timeout: float) -> str | None:
    """Why the Hub cannot be used right now, or None if a TCP connection to it opens.

    The probe runs in a daemon thread that we stop waiting for after ``timeout`` seconds:
    a DNS lookup has no timeout of its own and can otherwise block for much longer.
    """
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout} s"
    if outcome[0] is not None:
        return f"cannot connect to {host}:{port} ({outcome[0]})"
    return None


def load_hub_dataset(name: str, *, timeout: float = 5.0) -> DatasetDict:
    """SST-2 or IMDb from the Hugging Face Hub with ``datasets.load_dataset`` (needs network).

    ``"sst2"`` is ``stanfordnlp/sst2`` (columns idx, sentence, label; the test split's labels
    are hidden, -1); ``"imdb"`` is ``stanfordnlp/imdb`` (text, label; train, test and
    unlabelled "unsupervised"). Offline, that is when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
    is set or the Hub does not answer within ``timeout`` seconds, it raises ``ConnectionError``
    at once instead of hanging on retries. The course's packaged corpora need no network.
    """
    if name not in HUB_DATASETS:
        raise ValueError(f"name must be one of {list(HUB_DATASETS)}, got {name!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    reason = hub_unreachable(timeout)
    if reason is not None:
        raise ConnectionError(
            f"load_hub_dataset({name!r}) needs the Hugging Face Hub, which is unavailable: "
            f"{reason}. The course's packaged corpora work offline: labkit.data.load_sentiment() "
            "for labelled tweets, labkit.data.load_shakespeare() for text."
        )
    return load_dataset(HUB_DATASETS[name])
