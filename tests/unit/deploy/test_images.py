"""The images (docker/*.Dockerfile) copy every source folder the package is built from: pyproject maps each
installed package to a folder (`[tool.setuptools] package-dir`), and `pip install /opt/refine` fails on the first
one missing. No Docker engine here to build them; this is the part of the build that can be checked without one.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def package_folders() -> set[str]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {folder.split("/")[0] for folder in setuptools["package-dir"].values()}


def copied(dockerfile: Path) -> set[str]:
    """The repository paths a Dockerfile copies into the image."""
    sources: set[str] = set()
    for line in dockerfile.read_text().splitlines():
        if match := re.match(r"COPY\s+(.+)\s+\S+$", line.strip()):
            sources.update(match.group(1).split())
    return sources


def test_the_package_folders_are_read_from_pyproject() -> None:
    assert {"refine_server", "contract", "policies", "engine_plugin", "kernels"} <= package_folders()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_copies_every_package_folder_and_the_build_files(dockerfile: Path) -> None:
    sources = copied(dockerfile)
    assert package_folders() | {"pyproject.toml", "README.md"} <= sources, sorted(sources)
    assert all((REPO / source).exists() for source in sources), sorted(sources)
