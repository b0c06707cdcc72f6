"""The book's citations resolve: every {cite} key in the notebooks and book pages is an entry of
book/references.bib, and every paper named as "Author et al. YEAR" in a notebook's prose
carries a {cite} right there.

Cheap and deterministic: reads the stored notebooks and markdown files, builds nothing. (The
book build fails on an unknown key too, since it runs Sphinx with -W, but only at the end of a
long run; this test says which key and where in a second.)
"""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIB = ROOT / "book" / "references.bib"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[!.]*.ipynb")) + sorted(
    (ROOT / "notebooks" / "exercises").glob("[!.]*.ipynb")
)
PAGES = sorted((ROOT / "book").glob("*.md"))

# MyST citation roles: {cite}`a`, {cite:p}`a,b`, {cite:t}`a`, {cite:ps}`a` ...
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]*)`")
ENTRY = re.compile(r"^@(\w+)\{([^,\s]+),", re.MULTILINE)
# a paper named in prose: "Vaswani et al. 2017", "Zhang & Sennrich 2019", "Lin, 2004",
# "Xiong et al. (2020)", "Wei and Zou (2019)"
NAMED = re.compile(
    r"\b[A-Z][A-Za-z\-]+(?: et al\.| & [A-Z][A-Za-z\-]+| and [A-Z][A-Za-z\-]+)?,? "
    r"\(?(?:19|20)\d\d[a-z]?\)?(?:'s)?"
)
AUTHORS = re.compile(r"et al\.| & | and |, (?:19|20)\d\d")


def bib_keys() -> list[str]:
    return [key for _, key in ENTRY.findall(BIB.read_text(encoding="utf-8"))]


def prose_sources() -> list[tuple[str, str]]:
    """(where, text) for every markdown cell of every notebook and every book page."""
    out = []
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "markdown":
                out.append((f"{path.name} cell {i}", cell.source))
    out += [(path.name, path.read_text(encoding="utf-8")) for path in PAGES]
    return out


def test_bibliography_keys_are_unique_and_complete():
    keys = bib_keys()
    assert len(keys) >= 25, f"only {len(keys)} entries in {BIB}"
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"duplicate keys in references.bib: {duplicates}"
    for entry in BIB.read_text(encoding="utf-8").split("\n@")[1:]:
        key = entry.split("{", 1)[1].split(",", 1)[0]
        for field in ("title", "author", "year"):
            assert re.search(rf"^\s*{field}\s*=", entry, re.MULTILINE), (key, field)


def test_every_cited_key_is_in_the_bibliography():
    known = set(bib_keys())
    unknown = []
    for where, text in prose_sources():
        for group in CITE.findall(text):
            unknown += [(where, k.strip()) for k in group.split(",") if k.strip() not in known]
    assert not unknown, f"cited but not in book/references.bib: {unknown}"


def test_papers_named_in_prose_are_cited_there():
    """ "Beltagy et al. 2020" must be followed by a {cite} within the same sentence."""
    uncited = []
    for where, text in prose_sources():
        for match in NAMED.finditer(text):
            if not AUTHORS.search(match.group(0)):
                continue  # a bare "word 2019" (a date, a version) is no citation
            after = text[match.end() : match.end() + 120]
            if "{cite" not in after.split(". ")[0] and "{cite" not in after[:12]:
                uncited.append((where, match.group(0)))
    assert not uncited, f"papers named without a {{cite}}: {uncited}"


@pytest.mark.parametrize("text", ["Beltagy et al. 2020", "Zhang & Sennrich 2019", "Lin, 2004"])
def test_the_name_pattern_finds_papers(text):
    match = NAMED.search(f"as shown by {text}, attention")
    assert match and AUTHORS.search(match.group(0)), text
