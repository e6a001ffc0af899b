"""Chunks relayed as the engine sent them: what refine needs from one, read off its JSON bytes.

A policy that does not change the stream (`none`, and SRGen, whose work happens inside vLLM) yields the
engine's chunk bytes untouched, so refine never decodes and re-encodes a token's chunk. Only a chunk that
may finish a choice is decoded (refine attaches its `refine` block to the last one). The checks are cheap
substring tests, written for vLLM's compact JSON and safe for any other spacing: a false "may finish" costs
one decode, never a wrong answer.
"""

from __future__ import annotations

from typing import Any

import msgspec

RelayedChunk = bytes  # one SSE event's data, as the engine sent it

# The first chunk of every relayed stream, before the engine's first event: the engine has answered 200, so
# the stream is open. refine sends the client its response headers then, as vLLM itself does, rather than
# with the first token, where the client's work on them would delay that token.
ACCEPTED: RelayedChunk = b""

_FINISH = b'"finish_reason"'
_NOT_FINISHED = b'"finish_reason":null'
NO_CHOICES = b'"choices":[]'
_EMPTY_TEXT = (b'"text":""', b'"content":""')


def may_finish(chunk: RelayedChunk) -> bool:
    """False only when no choice in the chunk finishes."""
    return _FINISH in chunk and _NOT_FINISHED not in chunk


def carries_tokens(chunk: RelayedChunk) -> bool:
    """A chunk with text in it: the ones time-to-first-token and inter-token latency are measured on."""
    return NO_CHOICES not in chunk and not any(empty in chunk for empty in _EMPTY_TEXT)


def finished_choices(chunk: dict[str, Any]) -> set[int]:
    """The indexes of the choices a decoded chunk finishes."""
    return {c.get("index", 0) for c in chunk.get("choices") or () if c.get("finish_reason")}


decode = msgspec.json.decode
encode = msgspec.json.encode
