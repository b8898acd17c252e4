"""mkdocs hook: a page line ``<!-- readme: Title -->`` becomes the README's
``## Title`` section (without its heading), so the site and the README share
one text. Links in it are made to work on the site: ``docs/x.md`` becomes
``x.md`` (a page beside it), and links to files that are not pages (examples,
benchmarks, the license) keep their text as code, since the site has no copy
of the repository."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_MARKER = re.compile(r"^<!-- readme: (.+?) -->$", re.M)
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def readme_section(title: str, text: str | None = None) -> str:
    """The body of the README's ``## title`` section (to the next ``## ``),
    its links rewritten for the site; ValueError if there is no such section."""
    text = README.read_text() if text is None else text
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"README.md has no section '## {title}'")

    def link(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            return m.group(0)
        if re.fullmatch(r"docs/[^/#]+\.md(#.*)?", target):
            return f"[{label}]({target[len('docs/'):]})"
        return label if label.startswith("`") else f"`{label}`"

    return _LINK.sub(link, match.group(1)).strip() + "\n"


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    return _MARKER.sub(lambda m: readme_section(m.group(1)), markdown)
