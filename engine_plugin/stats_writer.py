"""The token-statistics writer: one device-to-host copy per step, and the files written by a thread.

The sampler's thread only enqueues: it copies the step's [rows, COLUMNS] statistics into one of a few pinned host
buffers (non-blocking on a GPU, with an event recorded behind the copy) and hands the buffer to the thread.
The thread waits for the event (the sampler never waits for the GPU on the statistics' behalf), turns the rows
into `token_stats_file` records and appends them, one write per request file per step. A buffer returns to the ring
once the thread has read it, so the sampler waits only when the thread is a whole ring behind.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from refine_server.contract.protocol import is_request_key
from refine_server.contract.token_stats_file import RECORD, stats_path

log = logging.getLogger(__name__)

# Columns of a step's statistics on the device: token id (as a float: exact below 2^24, above any vocabulary),
# entropy, varentropy, margin, probability of the sampled token, token confidence, stopped (0 or 1).
COLUMNS = 7
RING = 4  # host buffers: steps the thread may fall behind before the sampler waits


@dataclass(frozen=True)
class RecordPlace:
    """Where one row's statistics go: the request's file, its sequence, the token's index in the completion."""

    key: str
    sequence: int
    output_index: int


class StatsWriter:
    def __init__(self, folder: Path, capacity: int, device: torch.device):
        self._folder = folder
        on_gpu = device.type == "cuda"
        self._host = [torch.empty((capacity, COLUMNS), dtype=torch.float32, pin_memory=on_gpu) for _ in range(RING)]
        self._copied = [torch.cuda.Event() if on_gpu else None for _ in range(RING)]
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(RING):
            self._free.put(slot)
        self._jobs: queue.Queue[tuple[int, list[RecordPlace]]] = queue.Queue()
        threading.Thread(target=self._run, name="refine-token-stats", daemon=True).start()

    def submit(self, values: torch.Tensor, places: list[RecordPlace]) -> None:
        """Queue one step's [rows, COLUMNS] statistics (on the device) for the files named by `places`."""
        slot = self._free.get()
        self._host[slot][: len(places)].copy_(values, non_blocking=True)
        copied = self._copied[slot]
        if copied is not None:
            copied.record()
        self._jobs.put((slot, places))

    def flush(self) -> None:
        """Block until every step submitted so far is on disk."""
        self._jobs.join()

    def _run(self) -> None:
        while True:
            slot, places = self._jobs.get()
            try:
                self._append(places, self._read(slot, len(places)))
            except Exception:  # a full disk must not stop the engine; the proxy will report missing tokens
                log.exception("refine: could not write token statistics")
            finally:
                self._jobs.task_done()

    def _read(self, slot: int, rows: int) -> list[list[float]]:
        try:
            copied = self._copied[slot]
            if copied is not None:
                copied.synchronize()  # this thread waits for the copy, not the sampler's
            return self._host[slot][:rows].tolist()
        finally:
            self._free.put(slot)

    def _append(self, places: list[RecordPlace], rows: list[list[float]]) -> None:
        by_key: dict[str, list[bytes]] = {}
        for place, (token, entropy, varentropy, margin, prob, confidence, stopped) in zip(places, rows):
            by_key.setdefault(place.key, []).append(
                RECORD.pack(
                    place.sequence,
                    place.output_index,
                    int(token),
                    entropy,
                    varentropy,
                    margin,
                    prob,
                    confidence,
                    int(stopped),
                )
            )
        self._folder.mkdir(parents=True, exist_ok=True)
        for key, records in by_key.items():
            if is_request_key(key):  # checked at admission too: a key never names a path outside the folder
                with open(stats_path(self._folder, key), "ab") as f:
                    f.write(b"".join(records))
