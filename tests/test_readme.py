"""The README's links and the repository paths it names resolve inside the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_link_and_named_doc_in_the_readme_exists():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)", text)  # markdown links
    targets += re.findall(r"`((?:docs|benchmarks|scripts|tests)/[\w./-]+\.(?:md|py|sh))", text)  # named files
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README names no file: the pattern is wrong"
    missing = sorted({t for t in local if not (REPO / t).exists()})
    assert not missing, f"the README points at files that do not exist: {missing}"
