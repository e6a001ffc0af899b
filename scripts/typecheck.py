"""Type-check refine's packages with mypy, laid out as they are installed.

pyproject's `package-dir` installs policies/, contract/, engine_plugin/ and kernels/ under refine_server, and an
editable install reaches them through an import hook, which mypy does not run. So this lays the packages out
as installed, as a tree of links in a temporary folder, and checks `refine_server` there (the settings are
pyproject's [tool.mypy]). Usage: python scripts/typecheck.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders: dict[str, str] = setuptools["package-dir"]  # installed package name -> source folder
    with tempfile.TemporaryDirectory(prefix="refine-typecheck-") as tmp:
        for package, folder in sorted(folders.items()):
            target = Path(tmp, *package.split("."))
            target.mkdir(parents=True, exist_ok=True)
            for entry in (ROOT / folder).iterdir():
                if entry.name != "__pycache__" and not (target / entry.name).exists():
                    (target / entry.name).symlink_to(entry)
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "refine_server"]
        return subprocess.run(command, cwd=tmp, env={**os.environ, "MYPYPATH": tmp}).returncode


if __name__ == "__main__":
    sys.exit(main())
