"""`refine` on the command line: settings from flags and REFINE_* variables, then uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic_settings import CliApp

from refine_server.config import Settings
from refine_server.models.resolve import UnknownModel, resolve_model
from refine_server.workers import serve_workers, worker_count


def main() -> None:
    settings = CliApp.run(Settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend call is noise
    if not settings.backend_url:
        try:
            resolve_model(settings.model)
        except UnknownModel as exc:
            sys.exit(f"refine: {exc}")  # before any worker or engine starts, and without a traceback
    workers = worker_count(settings)
    if workers > 1:
        serve_workers(settings, workers)
        return
    from refine_server.app import create_app  # imported here: serve_workers must set up metrics first

    # refine's own access log would print every request line; its metrics already count them.
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )
