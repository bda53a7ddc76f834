"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README should show the Python API"
    monkeypatch.chdir(tmp_path)  # examples write their checkpoints into the working directory
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "tiny-olmoe" / "config.json").is_file()
