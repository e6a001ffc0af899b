"""Fake bundled models: small parts in distributions made in a temporary folder on sys.path, found through
importlib.metadata as the real packages are."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from refine_server.models.catalog import BundledModel, PackagedPart

PART_DATA = (b"GGUF fake part one ", b"and part two")


def install_fake_distribution(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A distribution as pip leaves it: its files, and a dist-info folder whose RECORD lists them."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    (dist_info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files))


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., BundledModel]:
    """`fake_model(installed=(0, 1), data=PART_DATA)`: a two-part model whose parts `installed` are on sys.path
    with the contents `data` (the pins are always those of PART_DATA)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    tag = tmp_path.name.replace("_", "-").lower()  # a distribution name of this test's own
    parts = tuple(
        PackagedPart(
            f"refine-fake-{tag}-part{i}", "1.0", f"refine_fake_{i}/data/part{i}.bin", hashlib.sha256(data).hexdigest()
        )
        for i, data in enumerate(PART_DATA)
    )
    model = BundledModel(
        name="Fake-Model",
        parts=parts,
        size=sum(map(len, PART_DATA)),
        sha256=hashlib.sha256(b"".join(PART_DATA)).hexdigest(),
        tool_call_parser="hermes",
    )

    def make(installed: tuple[int, ...] = (0, 1), data: tuple[bytes, ...] = PART_DATA) -> BundledModel:
        for i in installed:
            install_fake_distribution(site, parts[i].distribution, parts[i].version, {parts[i].file: data[i]})
        return model

    return make
