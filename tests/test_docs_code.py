"""Every ```python block of the README and the docs runs (each page's blocks in order,
in one fresh process with 4 host CPU devices, as the sharding page needs); blocks that
include an example script by snippet are run by `test_examples.py` instead."""

import pathlib
import re

import pytest

from .helpers import ROOT, run_on_host_devices


PAGES = [
    path
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    if "```python" in path.read_text()
]


def _blocks(page: pathlib.Path) -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    return [block for block in blocks if "--8<--" not in block]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page):
    blocks = _blocks(page)
    if not blocks:
        pytest.skip("only snippets of example scripts")
    program = "\n\n".join(blocks)
    result = run_on_host_devices(["-c", program], 4, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_page_with_code_is_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "differential_privacy.md", "ghost_clipping.md"} <= names
