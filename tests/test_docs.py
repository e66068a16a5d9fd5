"""The README stays a five-minute read, and no link in it or in docs/ points at nothing.

Anchors are checked against GitHub's heading slugs, the way the pages are read on GitHub.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 350

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks, whose lines are neither headings nor links."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, punctuation dropped,
    spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(prose(path.read_text())):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    return [target for _, target in LINK.findall(INLINE_CODE.sub("", prose(path.read_text())))]


def broken_links(path: Path) -> list[str]:
    """Each relative link of a page whose file or heading does not exist, with why."""
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    return broken


def table_of_contents(text: str) -> list[str]:
    """The link targets listed under the README's "Contents" heading."""
    body = prose(text)
    heading = re.search(r"^##\s+(Table of contents|Contents)\s*$", body, re.M | re.I)
    assert heading, "README has no '## Contents' heading"
    section = re.split(r"^#{1,6}\s", body[heading.end():], maxsplit=1, flags=re.M)[0]
    return [target for _, target in LINK.findall(section)]


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_github_slugs_drop_code_marks_and_punctuation():
    assert slug("`export-volume`: volumes to image objects") == "export-volume-volumes-to-image-objects"
    assert slug("Admin API (`/_localoci/`)") == "admin-api-_localoci"
    assert slug("Start here: `make demo` and `make test`") == "start-here-make-demo-and-make-test"
    assert slug("More in docs/") == "more-in-docs"


def test_readme_is_under_350_lines():
    lines = README.read_text().count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move details into docs/"


def test_readme_shows_make_demo_and_make_test_before_its_table_of_contents():
    text = README.read_text()
    contents = re.search(r"^##\s+(Table of contents|Contents)\s*$", text, re.M | re.I)
    assert contents, "README has no '## Contents' heading"
    before = text[:contents.start()]
    for command in ("make demo", "make test"):
        assert re.search(rf"^{command}\b", before, re.M), f"`{command}` is not shown as a command before the contents"


def test_readme_table_of_contents_points_at_headings_of_the_readme():
    targets = table_of_contents(README.read_text())
    assert targets, "the table of contents lists nothing"
    headings = anchors(README)
    assert [t for t in targets if not t.startswith("#") or t[1:] not in headings] == []


def test_readme_table_of_contents_lists_every_section_after_it():
    text = prose(README.read_text())
    listed = {t[1:] for t in table_of_contents(text)}
    after = text[re.search(r"^##\s+(Table of contents|Contents)\s*$", text, re.M | re.I).end():]
    sections = [slug(m.group(1)) for m in re.finditer(r"^##\s+(.+?)\s*$", after, re.M)]
    assert [s for s in sections if s not in listed] == []


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    assert broken_links(page) == []


def test_docs_index_links_every_page_in_docs():
    indexed = {(DOCS / target.partition("#")[0]).resolve() for target in links(DOCS / "README.md")}
    pages_in_docs = {p.resolve() for p in DOCS.glob("*.md") if p.name != "README.md"}
    assert sorted(p.name for p in pages_in_docs - indexed) == []


def test_readme_glossary_defines_each_name_the_docs_rely_on():
    text = README.read_text()
    glossary = re.split(r"^##\s", text.split("### Glossary", 1)[1], maxsplit=1, flags=re.M)[0]
    for term in ("worker VM", "run host", "import slot", "instance's network"):
        assert f"**{term}**" in glossary, f"the glossary does not define {term}"
