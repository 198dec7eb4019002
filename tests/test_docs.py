"""The generated parts of docs/ (each script's --help, the recipe table) are what the code says now:
cog regenerates every block in memory and the page must not change. `make docs` rewrites them."""
import difflib
import glob
import os
import sys

import pytest
from cogapp import Cog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
sys.path.insert(0, os.path.join(ROOT, "docs"))  # docs_gen, which the pages import


def test_every_page_is_found():
    names = {os.path.basename(p) for p in PAGES}
    assert {"training.md", "evaluating.md", "exporting.md", "predicting.md", "benchmarking.md", "reproducing.md",
            "errors.md", "testing.md", "contributing.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_generated_blocks_are_current(page):
    with open(page, encoding="utf-8") as f:
        text = f.read()
    cog = Cog()
    cog.options.verbosity = 0
    regenerated = cog.process_string(text, fname=page)
    diff = "\n".join(difflib.unified_diff(text.splitlines(), regenerated.splitlines(), lineterm="", n=0))
    assert regenerated == text, f"{os.path.relpath(page, ROOT)} is out of date (run make docs):\n{diff[:2000]}"
