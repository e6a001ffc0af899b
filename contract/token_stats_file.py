"""The token-statistics file: how the engine hands per-token statistics to the proxy (no torch, no numpy).

One binary file per request key, `{key}.stats`, in the events folder (`protocol.events_dir`). The engine's
writer thread appends one fixed-size little-endian record per sampled token of every sequence that asked:

    offset  type     field
    0       int32    sequence      which sequence of the request (n > 1: one per choice, in admission order)
    4       int32    output_index  position of the sampled token in that sequence's completion (0 = first)
    8       int32    token_id      the token the sampler drew
    12      float32  entropy       H of the next-token distribution at the request's temperature (nats)
    16      float32  varentropy    variance of the surprisal -log p under that distribution
    20      float32  margin        p_top1 - p_top2
    24      float32  prob          p(token_id) under that distribution
    28      float32  confidence    DeepConf's token confidence -(1/k) * sum of the k largest log p, at T = 1
    32      int32    stopped       1 when the confidence stop forced this token (end-of-sequence); -1 when the
                                   sequence asked for a stop the engine could not give it (no free slot); else 0

36 bytes a token, no header: the plugin's version travels in the handshake. The same (sequence, output_index)
may appear more than once (a partial prompt chunk's discarded draw, a preempted sequence recomputed): the
later record is the one that counts. Records for one step are appended in one write, so a reader may see a
file that ends mid-step, never mid-record; it reads whole records only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

RECORD = struct.Struct("<iiifffffi")  # 36 bytes: the table above
STOPPED = 1  # `stopped`: the confidence stop forced this token
STOP_WAIVED = -1  # `stopped`: the sequence runs without the stop it asked for
SUFFIX = ".stats"


@dataclass(frozen=True)
class StatsRecord:
    sequence: int
    output_index: int
    token_id: int
    entropy: float
    varentropy: float
    margin: float
    prob: float
    confidence: float
    stopped: int


def stats_path(folder: Path, key: str) -> Path:
    return folder / f"{key}{SUFFIX}"


def read_stats(folder: Path, key: str) -> dict[int, dict[int, StatsRecord]] | None:
    """Proxy side: every record so far, by sequence then output index (later records win), or None when the
    engine never wrote for this key."""
    try:
        data = stats_path(folder, key).read_bytes()
    except FileNotFoundError:
        return None
    whole = len(data) - len(data) % RECORD.size
    sequences: dict[int, dict[int, StatsRecord]] = {}
    for fields in RECORD.iter_unpack(data[:whole]):
        record = StatsRecord(*fields)
        sequences.setdefault(record.sequence, {})[record.output_index] = record
    return sequences


def discard_stats(folder: Path, key: str) -> None:
    stats_path(folder, key).unlink(missing_ok=True)
