"""No number in README.md or docs/ without its source (the convention: docs/development.md, "Numbers in the docs").

A *number claim* is a measured or predicted quantity written in prose or a table: a number with a decimal
point and a unit of memory (``5.47 GiB``), any time (``744 ms``, ``52 s``), percentage (``52.0%``), ratio
(``2.1×``) or percentage points, and any number in e-notation (``1.70e-15``). Not claims: code blocks and
inline code (commands, keys, values to type), headings, and whole numbers of bytes (sizes one chooses:
``80 GiB``, ``--memory-budget 11GiB``).

A claim's *source* is named in its block (a paragraph, a list item, a table row's table) or, for a table
or a list, in the paragraph just before it: a path that exists under ``reports/`` (the committed report
that today's code produced), ``tests/`` (a tolerance a test holds), ``experiments/`` or ``gcbench/`` (a
figure the code or an experiment file fixes), or a web link (a published figure: the paper, a peer's docs).
Run ``pytest tests/test_provenance.py -s -k listing`` to see every claim with its source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

CLAIM = re.compile(
    r"(?<![\w.])(?:"
    r"\d[\d,]*\.\d+\s?(?:[KMGT]i?B|GB|MB)\b"  # 5.47 GiB (a whole number of bytes is a size, not a claim)
    r"|\d[\d,]*(?:\.\d+)?\s?(?:ms|µs|s|seconds?|min|minutes?)\b"  # 744 ms, 52 s
    r"|\d[\d,]*(?:\.\d+)?\s?(?:%(?!\s?(?:interval|CI|confidence))|pp\b|percentage points)"  # 52.0% (not "95% CI")
    r"|\d[\d,]*(?:\.\d+)?\s?×|\d+\.\d+x\b"  # 2.1×, 0.7x
    r"|\d(?:\.\d+)?e[-+]?\d+"  # 1.70e-15
    r")"
)
SOURCE = re.compile(r"(?<![\w/.-])((?:\.\./)?(?:reports|tests|experiments|gcbench)/[\w./-]*[\w/]|https?://\S+)")


@dataclass(frozen=True)
class Claim:
    page: str
    line: int
    text: str
    sources: tuple[str, ...]


@dataclass
class Block:
    kind: str  # paragraph, item (of a list), table
    line: int
    raw: str  # as written: where the sources are named (a path in inline code names one too)

    @property
    def prose(self) -> str:
        """What a reader reads as claims: without inline code (commands, keys, values) and HTML comments."""
        return re.sub(r"<!--.*?-->", "", re.sub(r"`[^`]*`", "`…`", self.raw))


def blocks(text: str) -> list[Block]:
    """Paragraphs, list items, tables and headings (whose text is no claim); code blocks left out."""
    found: list[Block] = []
    fenced = False
    current: Block | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced, current = not fenced, None
            continue
        if fenced or not stripped:
            current = None
            continue
        if stripped.startswith("#"):  # a heading: what follows it names its own sources
            found.append(Block("heading", number, stripped))
            current = None
            continue
        kind = "table" if stripped.startswith("|") else "item" if re.match(r"([-*+]|\d+\.)\s", stripped) else None
        if kind == "table" and current is not None and current.kind == "table":
            current.raw += "\n" + stripped
        elif kind is not None or current is None:
            current = Block(kind or "paragraph", number, stripped)
            found.append(current)
        else:
            current.raw += " " + stripped  # a paragraph's or an item's next line
    return found


def sources_in(text: str, page: Path) -> tuple[str, ...]:
    """The sources ``text`` names: web links, and paths that exist (from the page or the repository's root)."""
    named = []
    for target in SOURCE.findall(text.replace("`", " ")):
        if target.startswith("http"):
            named.append(target.rstrip(").,;"))
            continue
        path = target.split("#")[0]
        if (page.parent / path).exists() or (REPO / path.removeprefix("../")).exists():
            named.append(path.removeprefix("../"))
    return tuple(dict.fromkeys(named))


def claims(page: Path, text: str | None = None) -> list[Claim]:
    """Every number claim of ``page`` with the sources its block names (a table or a list item: also the
    paragraph before it)."""
    found: list[Claim] = []
    lead: tuple[str, ...] = ()  # the sources of the last paragraph, for the tables and lists after it
    for block in blocks(page.read_text() if text is None else text):
        if block.kind == "heading":
            lead = ()
            continue
        own = sources_in(block.raw, page)
        if block.kind == "paragraph":
            lead = own
        sources = own if block.kind == "paragraph" else own or lead
        name = str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name
        found += [Claim(name, block.line, number.strip(), sources) for number in CLAIM.findall(block.prose)]
    return found


def every_claim() -> list[Claim]:
    return [claim for page in PAGES for claim in claims(page)]


def test_every_number_in_the_docs_names_its_source() -> None:
    unsourced = [c for c in every_claim() if not c.sources]
    assert not unsourced, "numbers without a source (see docs/development.md, Numbers in the docs):\n" + "\n".join(
        f"{c.page}:{c.line}: {c.text}" for c in unsourced
    )


def test_listing_every_claim_with_its_source() -> None:
    """Every claim with its source, printed (``-s``, or ``-rP``): what a reviewer checks numbers against."""
    listing = every_claim()
    assert listing, "no claims found: the scanner is broken"
    print("\n".join(f"{c.page}:{c.line}: {c.text} <- {', '.join(c.sources) or 'NO SOURCE'}" for c in listing))


@pytest.mark.parametrize(
    ("markdown", "unsourced"),
    [
        ("The step needs 5.47 GiB.\n", ["5.47 GiB"]),  # a measured number, no source: caught
        ("The step needs 5.47 GiB ([`reports/quick/`](reports/quick/report.md)).\n", []),
        ("It took 744 ms and 52.0% more (reports/no-such-report/).\n", ["744 ms", "52.0%"]),  # the path must exist
        ("Set `--memory-budget 11GiB`; an 80 GiB card.\n\n```sh\ngcbench sweep --max-time 5\n```\n", []),
        ("Made by reports/quick/report.md:\n\n| a | b |\n| --- | --- |\n| 1 | 2.5 GiB |\n", []),  # the table's lead-in
        ("Nothing here.\n\n| a | b |\n| --- | --- |\n| 1 | 1.70e-15 |\n", ["1.70e-15"]),
        ("Published: 20% slower ([paper](https://arxiv.org/abs/2101.06983)).\n", []),
    ],
)
def test_the_rules_catch_what_they_should(markdown: str, unsourced: list[str]) -> None:
    """The controls: a number without a source, or with a path that does not exist, is caught; code,
    whole sizes and sourced numbers are not."""
    page = REPO / "docs" / "page.md"  # paths resolve as from a page in docs/ (the file is never written)
    assert [c.text for c in claims(page, markdown) if not c.sources] == unsourced
