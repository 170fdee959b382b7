"""Every design-document citation in the code points at a section that exists in docs/DESIGN.md.

Comments, docstrings and docs cite the design document by section number: ``DESIGN`` or ``DESIGN.md``
followed by ``§`` and a number, a dotted subsection (``§6.2``), or a list (``§3, §5``). This collects every such
citation in fasttrain/, kernels/, benchmarks/, tests/, tools/ and .ci/ (where present) and README.md, and checks
that each cited number is a heading of docs/DESIGN.md (``## §3 Title`` or ``### §6.2 Title``). It also checks
that the headings are unique (a citation resolves to one place), that the document's own cross-references
resolve, and that the scan found citations at all, so a broken pattern cannot make it pass vacuously.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "DESIGN.md"
SCANNED_DIRS = ("fasttrain", "kernels", "benchmarks", "tests", "tools", ".ci")  # absent ones are skipped
SCANNED_FILES = ("README.md",)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".ini", ".txt", ".rst"}
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".venv", "node_modules"}

SECTION = r"§\d+(?:\.\d+)*"
# "DESIGN §3", "DESIGN.md §6.2", "DESIGN §3, §5", "DESIGN §1 and §6"; the number may be followed by
# punctuation or a possessive ("DESIGN §7's lengths").
CITATION_RE = re.compile(rf"\bDESIGN(?:\.md)?\s+({SECTION}(?:\s*(?:,|and|&)\s*{SECTION})*)")
NUMBER_RE = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING_RE = re.compile(r"^#{2,6}\s+§(\d+(?:\.\d+)*)\s+\S", re.MULTILINE)


def _scanned_files() -> list[Path]:
    files = [REPO / name for name in SCANNED_FILES if (REPO / name).is_file()]
    for folder in SCANNED_DIRS:
        root = REPO / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if (path.is_file() and path.suffix in TEXT_SUFFIXES
                    and not SKIPPED_PARTS.intersection(path.relative_to(REPO).parts)
                    and path.resolve() != Path(__file__).resolve()):
                files.append(path)
    return files


def _citations() -> list[tuple[str, int, str]]:
    """(file relative to the repository, line number, cited section number) for every citation."""
    found = []
    for path in _scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for match in CITATION_RE.finditer(line):
                for number in NUMBER_RE.findall(match.group(1)):
                    found.append((str(path.relative_to(REPO)), lineno, number))
    return found


def _headings() -> list[str]:
    return HEADING_RE.findall(DOC.read_text(encoding="utf-8"))


def test_design_doc_exists_with_numbered_sections():
    assert DOC.is_file(), "docs/DESIGN.md is missing"
    headings = _headings()
    top = {h for h in headings if "." not in h}
    # The sections the code has cited since before the document lived in the repository.
    assert {str(n) for n in range(1, 8)} <= top, f"top-level sections found: {sorted(top, key=int)}"


def test_section_headings_are_unique():
    headings = _headings()
    duplicates = sorted({h for h in headings if headings.count(h) > 1})
    assert not duplicates, f"docs/DESIGN.md has more than one heading for section(s) {duplicates}"


def test_subsections_sit_under_their_section():
    headings = set(_headings())
    orphans = [h for h in headings if "." in h and h.rsplit(".", 1)[0] not in headings]
    assert not orphans, f"subsection(s) without a parent section heading: {orphans}"


def test_citations_are_found():
    citations = _citations()
    assert citations, "no DESIGN citations found: the scan or its pattern is broken"
    files = {f for f, _, _ in citations}
    # Code in both packages cites the document today; a scan that misses a whole tree is broken.
    assert any(f.startswith("fasttrain/") for f in files), sorted(files)
    assert any(f.startswith("kernels/") for f in files), sorted(files)


def test_every_citation_names_an_existing_section():
    headings = set(_headings())
    dangling = [f"{f}:{line}: DESIGN §{number}" for f, line, number in _citations() if number not in headings]
    assert not dangling, ("citations of sections that docs/DESIGN.md does not have (add the section, or fix "
                          "the citation):\n" + "\n".join(dangling))


def test_cross_references_inside_the_doc_resolve():
    text = DOC.read_text(encoding="utf-8")
    headings = set(_headings())
    body = HEADING_RE.sub("", text)
    missing = sorted({n for n in NUMBER_RE.findall(body) if n not in headings},
                     key=lambda n: [int(p) for p in n.split(".")])
    assert not missing, f"docs/DESIGN.md refers to section(s) it does not have: {missing}"


@pytest.mark.parametrize("line,expected", [
    ("(DESIGN §3, §5).", ["3", "5"]),
    ("DESIGN.md §6.2: bf16 masters", ["6.2"]),
    ("as DESIGN §7's lengths say", ["7"]),
    ("DESIGN §1 and §6", ["1", "6"]),
    ("the DESIGN document, §4", []),
])
def test_citation_pattern(line, expected):
    numbers = [n for m in CITATION_RE.finditer(line) for n in NUMBER_RE.findall(m.group(1))]
    assert numbers == expected
