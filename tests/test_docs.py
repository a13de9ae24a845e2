"""Issue 9 item 12: the documentation stands alone. It carries its own design document and
links only to files in the repository (the README pointed at ../shared/DESIGN.md, a file a
user who clones the project does not have)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *ROOT.glob("models/**/*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_point_only_at_files_in_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "shared/DESIGN" not in text
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert path.exists(), f"{page.name} links to a missing file: {target}"


def test_the_design_document_covers_method_statistics_space_and_architecture() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (\d)\. (.+)$", design, re.M)
    assert [n for n, _ in headings] == ["1", "2", "3", "4", "5", "6"]
    for needed in (
        "Clopper-Pearson",
        "Ville's inequality",
        "[0, 1] RGB pixel space",
        "tensor_sha256",
        "CC BY-NC 4.0",
    ):
        assert needed in design
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/DESIGN.md)" in readme
