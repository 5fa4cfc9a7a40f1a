"""The README points only at what the repository holds: every Markdown link and every path it
names (`docs/X.md`, benchmarks/x.py, ...) exists, and it promises nothing as "coming"."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# A path under one of the repository's folders, as the README writes them (in backticks or not).
_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|deploy|src|scripts|tests)/[\w./-]*[\w/])")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_link_and_path_in_the_readme_exists() -> None:
    named = set(_PATH.findall(README)) | {t for t in _LINK.findall(README) if "://" not in t}
    assert "docs/API.md" in named  # the patterns find what the README names
    missing = []
    for target in sorted(named):
        path, _, _anchor = target.partition("#")
        if path and not (ROOT / path).exists():
            missing.append(target)
    assert not missing, missing


def test_the_readme_links_nothing_outside_the_repository_and_promises_nothing() -> None:
    assert "../" not in README and "DESIGN.md" not in README
    assert "(coming)" not in README and "coming soon" not in README.lower()
