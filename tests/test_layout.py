"""labkit's layout: every name a notebook imports exists, subpackages say what they hold, and the
library never reaches into the course tooling."""

import ast
import functools
import importlib
import importlib.metadata
import json
import pkgutil
import re
import sys
import tomllib
from pathlib import Path

import pytest

import labkit

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").rglob("*.ipynb"))
SUBPACKAGES = [
    "nn", "models", "data", "train", "inference", "interp", "viz", "apps", "course"
]


def _code(cell_source: str) -> str:
    """A code cell as Python: IPython magics and shell escapes become blank lines."""
    lines = cell_source.splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


@functools.cache  # parsed once for the tests below
def _notebook_imports() -> dict[tuple[str, str], set[str]]:
    """{(module, name): notebooks} for each ``from labkit... import name``, ``import labkit...``."""
    found: dict[tuple[str, str], set[str]] = {}
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] != "code":
                continue
            for node in ast.walk(ast.parse(_code("".join(cell["source"])))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("labkit"):
                    for alias in node.names:
                        found.setdefault((node.module, alias.name), set()).add(path.name)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] == "labkit":
                            found.setdefault((alias.name, ""), set()).add(path.name)
    return found


def test_every_labkit_name_a_notebook_imports_exists():
    imports = _notebook_imports()
    assert len(imports) > 50, "the parser found too few labkit imports in the notebooks"
    missing = []
    for (module, name), notebooks in sorted(imports.items()):
        mod = importlib.import_module(module)
        if name and not hasattr(mod, name):
            missing.append(f"from {module} import {name}  ({', '.join(sorted(notebooks))})")
    assert not missing, "names the notebooks import but labkit lacks:\n" + "\n".join(missing)


def test_notebooks_use_only_the_course_tooling_notebooks_readme_names():
    """notebooks/README.md lists what notebooks take from ``labkit.course``; a new use of the
    course tooling in a notebook must be named there too."""
    used = {module for module, _ in _notebook_imports() if module.startswith("labkit.course")}
    readme = (ROOT / "notebooks" / "README.md").read_text()
    unnamed = sorted(m for m in used if f"`{m.removeprefix('labkit.course.')}`" not in readme)
    assert used and not unnamed, f"notebooks/README.md does not name {unnamed}"


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_says_what_lives_where_and_exports_real_names(name):
    package = importlib.import_module(f"labkit.{name}")
    doc = package.__doc__ or ""
    modules = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    assert modules, f"labkit.{name} has no modules"
    for module in modules:  # the docstring names every module of the subpackage
        assert f"``{module}``" in doc or f"``{module}.py``" in doc, (name, module)
    for exported in getattr(package, "__all__", []):
        assert getattr(package, exported, None) is not None, (name, exported)


def test_the_library_does_not_import_the_course_tooling():
    library = [
        p for p in (ROOT / "labkit").rglob("*.py")
        if "course" not in p.relative_to(ROOT / "labkit").parts and p.name != "__main__.py"
    ]
    assert len(library) > 20
    for path in library:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("labkit.course"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("labkit.course") for a in node.names), path


def test_every_module_level_import_is_a_declared_dependency():
    """A plain ``pip install labkit`` can import every module: each third-party package a
    labkit module imports at its top is in pyproject's ``dependencies`` (not only an extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", d)[0].lower() for d in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for path in sorted((ROOT / "labkit").rglob("*.py")):
        # module level only: an import inside a function may need an extra (and says so)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in {"labkit", "__future__"}:
                    continue
                names = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not names & declared:
                    undeclared.append(f"{path.relative_to(ROOT)}: {top}")
    assert not undeclared, f"imported at module level but not in dependencies: {undeclared}"


def test_only_the_documented_modules_sit_at_the_top_level():
    flat = {p.stem for p in (ROOT / "labkit").glob("*.py")}
    # new code goes into a subpackage (see labkit/__init__.py), not next to these
    assert flat <= {"__init__", "__main__", "device", "generation", "inference"}, flat
    assert labkit.__version__
