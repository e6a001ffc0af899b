"""The folders' import rules, read from the source: what may import what across refine's process lines.

- policies/ (installed as refine_server.policies) knows the server only through its own Protocols
  (policies/transport.py): it imports nothing of refine_server's server modules, not even for types;
- engine_plugin/ runs inside vLLM: no FastAPI, no policies, no server modules;
- contract/ is what both sides share: no torch, vLLM or FastAPI, and nothing of refine but itself;
- kernels/ are pure tensor code: nothing of refine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(folder: str) -> dict[str, set[str]]:
    """Every module each file of `folder` imports (absolute names; `if TYPE_CHECKING` blocks included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def _offending(folder: str, allowed_refine: tuple[str, ...], banned: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path, names in _imports(folder).items():
        for name in names:
            top = name.split(".")[0]
            inside_refine = name.startswith("refine_server")
            if inside_refine and not any(name == a or name.startswith(a + ".") for a in allowed_refine):
                bad.append(f"{path}: {name}")
            if top in banned:
                bad.append(f"{path}: {name}")
    return sorted(bad)


@pytest.mark.parametrize(
    ("folder", "allowed", "banned"),
    [
        ("policies", ("refine_server.policies", "refine_server.contract"), ("fastapi", "starlette", "aiohttp")),
        (
            "engine_plugin",
            ("refine_server.engine_plugin", "refine_server.contract", "refine_server.kernels"),
            ("fastapi", "starlette", "aiohttp"),
        ),
        ("contract", ("refine_server.contract",), ("torch", "vllm", "fastapi", "starlette", "numpy")),
        ("kernels", ("refine_server.kernels",), ("vllm", "fastapi")),
    ],
)
def test_each_folder_imports_only_across_the_lines_it_may(
    folder: str, allowed: tuple[str, ...], banned: tuple[str, ...]
) -> None:
    assert _offending(folder, allowed, banned) == []


def test_the_rule_sees_an_import_under_type_checking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads TYPE_CHECKING imports too: a policy that types against the server is caught."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "sneaky.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from refine_server.backend import Backend\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert _offending("policies", ("refine_server.policies",)) == ["policies/sneaky.py: refine_server.backend"]


def test_every_package_folder_is_in_the_wheel() -> None:
    """An editable install finds subpackages on disk; a wheel (the Docker images, `pip install .`) has only those
    pyproject lists: every folder with an __init__.py under a mapped folder must be listed."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                relative = init.parent.relative_to(ROOT / folder).parts
                on_disk.add(".".join((package, *relative)))
    assert on_disk - listed == set()
