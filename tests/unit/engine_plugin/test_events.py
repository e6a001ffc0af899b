"""events: the engine's event writer."""

from __future__ import annotations

from refine_server.contract.protocol import read_events
from refine_server.engine_plugin.events import EventWriter


def test_event_writer_writes_off_the_caller_and_flush_waits(engine_env) -> None:
    writer = EventWriter(engine_env, tokenizer_name=None)
    writer.emit("a" * 32, {"event": "correction", "token_before": {"id": 1}})
    writer.flush()
    assert read_events(engine_env, "a" * 32) == [{"event": "correction", "token_before": {"id": 1, "text": None}}]
