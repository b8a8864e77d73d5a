"""The one structural rule: infra -> flows -> tasks -> stages, never back; stages stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "stages": {"prefect", "mlflow", "tasks", "flows", "herd"},
    "tasks": {"flows", "herd.cli"},
    "flows": {"herd.cli"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, mod in _imports(path):
            for banned in FORBIDDEN[package]:
                if mod == banned or mod.startswith(banned + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "imports point back up the layers:\n" + "\n".join(bad)


def test_stages_read_no_environment() -> None:
    bad = []
    for path in sorted((ROOT / "stages").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"}:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "stages/ must take everything from its config, not the environment: " + ", ".join(bad)


def test_architecture_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom prefect import flow\n")
    assert ("prefect" in {m for _, m in _imports(bad)})
