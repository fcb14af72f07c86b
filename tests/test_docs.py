"""The README leads (short, every link alive); the details live in docs/."""

import re

from conftest import REPO

LINK = re.compile(r"\]\(([^)#]+)\)")


def test_readme_is_short_and_links_only_to_files_that_exist():
    readme = (REPO / "README.md").read_text()
    assert len(readme) < 10_000
    documents = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for document in documents:
        for target in LINK.findall(document.read_text()):
            if target.startswith("http"):
                continue
            assert (document.parent / target).exists(), f"{document.name} links to {target}"


def test_every_doc_is_reachable_from_the_readme():
    text = (REPO / "README.md").read_text() + (REPO / "docs" / "data.md").read_text()
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in text or f"({doc.name})" in text, doc.name
