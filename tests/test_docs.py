"""The documentation holds together: every internal link in README.md and docs/ resolves (file
and anchor), and every page is in the mkdocs nav. ``mkdocs build --strict`` in .ci/run checks the
site as rendered; this test checks the README too, and runs in seconds without mkdocs."""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The page without code blocks and inline code (links there are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def slugify(heading: str) -> str:
    """Python-Markdown's toc slug (the one mkdocs uses): ids of a page's headings."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](link) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _load_hooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts/mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


@functools.cache
def page_text(page: Path) -> str:
    """The page as mkdocs renders it: generated sections (scripts/mkdocs_hooks.py) filled in."""
    text = page.read_text()
    if "<!-- graddiff:" in text:
        text = _load_hooks().on_page_markdown(text, None, None, None)
    return text


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", page_text(page))):
        slug = slugify(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}_{n}")
    return out


def internal_links(page: Path) -> list[str]:
    prose = _prose(page.read_text())
    targets = _LINK.findall(prose) + _IMAGE.findall(prose)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_internal_links_resolve(page):
    broken = []
    for target in internal_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(
                f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
            )
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, re.M))
    missing = sorted(p.name for p in DOCS.glob("*.md") if p.name not in listed)
    assert not missing, f"pages missing from mkdocs.yml nav: {missing}"


def test_slugify_matches_mkdocs():
    assert slugify("`--json` and exit codes") == "-json-and-exit-codes"
    assert slugify("The tolerance, and why 1e-3") == "the-tolerance-and-why-1e-3"
    assert slugify("## `graddiff compare`".lstrip("# ")) == "graddiff-compare"


def test_cli_reference_covers_every_command():
    """docs/cli.md is generated from the click commands by scripts/mkdocs_hooks.py."""
    import click

    from graddiff.cli import main

    text = page_text(DOCS / "cli.md")
    assert "<!-- graddiff:cli -->" not in text
    for name in main.list_commands(click.Context(main)):
        assert f"## `graddiff {name}`" in text
    assert "| `--rtol FLOAT` |" in text  # options with their metavar and help
