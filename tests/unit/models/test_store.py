"""Provisioning into the cache: checked before converting, converted once, never half-written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from refine_server.models import store
from refine_server.models.catalog import BundledModel
from refine_server.models.parts import ModelUnavailable
from tests.unit.models.conftest import PART_DATA


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The GGUFs converted, in order; the stand-in converter writes a folder with a config.json."""
    seen: list[bytes] = []

    def convert(gguf: Path, out_dir: Path) -> None:
        seen.append(gguf.read_bytes())
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(store, "convert_gguf", convert)
    return seen


def test_the_joined_gguf_is_converted_once_into_the_cache(
    fake_model: Callable[..., BundledModel], conversions: list[bytes], tmp_path: Path
) -> None:
    model = fake_model()
    cache = tmp_path / "cache"
    first = store.ensure_model(model, cache, install=False)
    assert first == cache / model.name and (first / "config.json").is_file()
    assert store.ensure_model(model, cache, install=False) == first
    assert conversions == [b"".join(PART_DATA)]
    assert sorted(p.name for p in cache.iterdir()) == [model.name, f"{model.name}.lock"]  # no staging left


def test_a_wrong_checksum_stops_before_conversion(
    fake_model: Callable[..., BundledModel], conversions: list[bytes], tmp_path: Path
) -> None:
    model = fake_model(data=(b"GGUF fake part ONE ", PART_DATA[1]))
    with pytest.raises(ModelUnavailable, match=model.parts[0].requirement):
        store.ensure_model(model, tmp_path / "cache", install=False)
    assert conversions == []
    assert not (tmp_path / "cache" / model.name).exists()


def test_an_interrupted_conversion_is_never_used_and_is_redone(
    fake_model: Callable[..., BundledModel], conversions: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fake_model()
    cache = tmp_path / "cache"
    convert = store.convert_gguf

    def half_then_fail(gguf: Path, out_dir: Path) -> None:
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise ModelUnavailable("converting failed: disk full")

    monkeypatch.setattr(store, "convert_gguf", half_then_fail)
    with pytest.raises(ModelUnavailable, match="disk full"):
        store.ensure_model(model, cache, install=False)
    assert sorted(p.name for p in cache.iterdir()) == [f"{model.name}.lock"]

    monkeypatch.setattr(store, "convert_gguf", convert)
    assert (store.ensure_model(model, cache, install=False) / "config.json").is_file()
    assert len(conversions) == 1


def test_a_missing_package_without_install_is_an_error_naming_it(
    fake_model: Callable[..., BundledModel], conversions: list[bytes], tmp_path: Path
) -> None:
    model = fake_model(installed=())
    with pytest.raises(ModelUnavailable) as err:
        store.ensure_model(model, tmp_path / "cache", install=False)
    assert all(part.requirement in str(err.value) for part in model.parts)
    assert conversions == []
