"""Every ```python block of README.md and docs/*.md runs as written."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks():
    blocks = []
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            for block in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S):
                blocks.append((os.path.relpath(page, ROOT), block))
    return blocks


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, capsys):
    page, block = python_blocks()[index]
    exec(compile(block, f"{page} block {index}", "exec"), {})
    printed = capsys.readouterr().out
    assert "False" not in printed


def test_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists."""
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", f.read()):
                path = os.path.normpath(os.path.join(os.path.dirname(page), target))
                assert os.path.exists(path), f"{page}: broken link {target}"


def test_api_reference_is_generated_from_the_current_docstrings():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "api_docs.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
