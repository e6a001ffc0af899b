"""`--model`: a bundled name, a folder, or an error at start that lists the bundled names."""

from __future__ import annotations

from pathlib import Path

import pytest

from refine_server.models.catalog import BUNDLED
from refine_server.models.resolve import UnknownModel, resolve_model


def test_bundled_names_and_folders_resolve(tmp_path: Path) -> None:
    for name, model in BUNDLED.items():
        choice = resolve_model(name)
        assert choice.bundled is model and choice.folder is None and choice.name == name
    folder = tmp_path / "my-model"
    folder.mkdir()
    choice = resolve_model(str(folder))
    assert choice.bundled is None and choice.folder == folder and choice.name == "my-model"


def test_an_unknown_name_lists_the_bundled_models(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id: refine never asks the hub
    for name in BUNDLED:
        assert name in str(err.value)
    with pytest.raises(UnknownModel):
        resolve_model(str(tmp_path / "missing-folder"))
