"""The package's layering, checked on the source (every import statement, at module level or inside functions):

- models/ imports no Lightning, no biozoo.train and no biozoo.envs;
- envs/ imports no biozoo.models and no biozoo.train;
- nothing under models/, envs/ or train/ imports the face (`biozoo`, `biozoo.cli`): only `biozoo._core`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

BANNED = {"models": ("lightning", "pytorch_lightning", "biozoo.train", "biozoo.envs"),
          "envs": ("biozoo.models", "biozoo.train"),
          "train": ()}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports resolved inside `package`."""
    parts = ["biozoo", package, *path.relative_to(REPO / package).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names = [f"{module}.{a.name}" for a in node.names] if module == "biozoo" else [module]
            out += [(node.lineno, n) for n in names]
    return out


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, name in imported_modules(path, package):
            banned = any(name == b or name.startswith(b + ".") for b in BANNED[package])
            face = name == "biozoo" or (name.startswith("biozoo.") and
                                        name.split(".")[1] not in ("models", "train", "envs", "_core"))
            if banned or face:
                found.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(BANNED))
def test_layering(package):
    assert violations(package) == []


def test_the_checker_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    import conftest

    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    import lightning\n    from ..train import tasks\n    from biozoo import cli\n")
    monkeypatch.setattr(conftest, "REPO", tmp_path)
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    assert [v.split(" imports ")[1] for v in violations("models")] == ["lightning", "biozoo.train", "biozoo.cli"]


def test_the_package_maps_folders():
    import biozoo.envs
    import biozoo.models
    import biozoo.train

    assert biozoo.models.__file__ == str(REPO / "models" / "__init__.py")
    assert biozoo.train.__file__ == str(REPO / "train" / "__init__.py")
    assert biozoo.envs.__file__ == str(REPO / "envs" / "__init__.py")
