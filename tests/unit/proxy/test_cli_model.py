"""`refine --model` with a name that is neither bundled nor a folder stops at once, saying which names exist."""

from __future__ import annotations

import subprocess
import sys

from refine_server.models.catalog import BUNDLED


def test_an_unknown_model_stops_refine_at_start_with_the_bundled_names() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "refine_server", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "neither a bundled model nor a model folder" in done.stderr
    assert all(name in done.stderr for name in BUNDLED)
    assert "Traceback" not in done.stderr and "Uvicorn running" not in done.stderr
