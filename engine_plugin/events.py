"""The engine side of the events channel: a writer thread, so the sampler step never touches the disk.

`apply` puts events on a queue; the thread names the tokens they mention (the tokenizer is loaded there, once)
and appends them to each request's event file. A step that corrected waits for its events to be written
before it returns (`flush`): the proxy reads a choice's events when the choice finishes, so a correction on a
choice's last token must be on disk before that token leaves the engine. Steps without corrections never wait.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

from refine_server.contract.protocol import append_event

log = logging.getLogger(__name__)


class EventWriter:
    def __init__(self, folder: Path, tokenizer_name: str | None):
        self._folder = folder
        self._tokenizer_name = tokenizer_name
        self._tokenizer: Any = None  # transformers' tokenizer, loaded on first use
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        threading.Thread(target=self._run, name="refine-events", daemon=True).start()

    def emit(self, key: str, event: dict[str, Any]) -> None:
        self._queue.put((key, event))

    def flush(self) -> None:
        """Block until every event emitted so far is on disk."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            key, event = self._queue.get()
            try:
                append_event(self._folder, key, self._with_token_text(event))
            except Exception:  # a full disk must not stop the engine; the trace will say "unavailable"
                log.exception("refine: could not write an engine event")
            finally:
                self._queue.task_done()

    def _with_token_text(self, event: dict[str, Any]) -> dict[str, Any]:
        for field in ("token_before", "token_after"):
            token = event.get(field)
            if isinstance(token, dict) and "id" in token and "text" not in token:
                token["text"] = self._decode(token["id"])
        return event

    def _decode(self, token_id: int) -> str | None:
        if self._tokenizer_name is None:
            return None
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
        return self._tokenizer.decode([token_id])
