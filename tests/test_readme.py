"""Every ```python block of README.md runs as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, capsys):
    exec(compile(python_blocks()[index], f"README block {index}", "exec"), {})
    printed = capsys.readouterr().out
    assert "False" not in printed
