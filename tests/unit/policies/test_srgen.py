"""policies.srgen without an engine: the trace when the engine could not report. tests/engine/test_srgen.py runs
SRGen inside the real engine."""

from __future__ import annotations

from refine_server.policies.base import CORRECTIONS
from refine_server.policies.srgen import _fill_trace
from tests.conftest import policy_call
from tests.fake_vllm import MODEL


def test_srgen_trace_says_when_the_engine_could_not_report(tmp_path) -> None:
    call = policy_call("completions", {"model": MODEL, "prompt": "x"}, backend=None)
    _fill_trace(call, tmp_path, "d" * 32)
    assert call.trace.data["engine_events"].startswith("unavailable")
    assert call.trace.data["corrections"] is None and CORRECTIONS.name not in call.trace.values
