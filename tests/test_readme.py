"""Every fenced ```python block of the README runs, in order, each on its own (its imports included), offline, in
an empty folder. A block that cannot run here says so in the README: `<!-- skip-test: reason -->` on the line
before its fence."""

import re

import pytest

from conftest import REPO

SKIP = re.compile(r"<!--\s*skip-test:\s*(.+?)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason) of every ```python block, in order."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            skip = SKIP.search(lines[i - 1]) if i else None
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", skip.group(1) if skip else None))
            i = end
        i += 1
    return blocks


def test_the_readme_has_python_blocks_and_skips_few():
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    assert sum(reason is not None for _, _, reason in blocks) <= 2  # skip markers are for network or GPU only


@pytest.mark.slow
def test_every_readme_python_block_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for line, code, reason in python_blocks((REPO / "README.md").read_text(encoding="utf-8")):
        if reason is not None:
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # a fresh namespace each
        except Exception as e:
            pytest.fail(f"the README's python block at line {line} failed: {type(e).__name__}: {e}")
