"""Everything under tests/engine/ runs against the real vLLM server: each test here is marked `engine`.

The server itself is tests/conftest.py's session fixture, started once for the whole run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ENGINE_TESTS = Path(__file__).parent


# tryfirst: the mark must be on the items before `-m` deselects by it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ENGINE_TESTS in item.path.parents:
            item.add_marker(pytest.mark.engine)
