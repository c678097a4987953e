"""The README is the front door: its commands are the ones CI runs, and every link in it and in the
pages it sends readers to resolves to a file of the checkout."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/layer.md", "docs/runner.md", "docs/benchmarks/README.md"]


def test_the_readme_is_short_and_its_test_command_is_cis():
    readme = (ROOT / "README.md").read_text()
    assert 150 <= len(readme.splitlines()) <= 200
    assert "python -m pytest -q -n 2" in readme
    assert "python -m pytest -q -n 2" in (ROOT / ".ci" / "run").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # the CPU build, on purpose
    assert "\n## Backends\n" in readme  # the section the backend table's owner keeps current


@pytest.mark.parametrize("page", PAGES)
def test_every_link_resolves(page):
    text = (ROOT / page).read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'(?:src|href)="([^"]+)"', text)
    local = [t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "#"))]
    missing = [t for t in local if t and not ((ROOT / page).parent / t).exists()]
    assert missing == []
