"""Streams relayed as the engine sent them: what refine needs from one event, read off its bytes.

A policy that does not change the stream (`none`, and SRGen, whose work happens inside vLLM) yields the
engine's events untouched, so refine never decodes and re-encodes a token's event. Only an event that may end
the answer is decoded (refine attaches its `refine` block to it). The checks are cheap substring tests, written
for vLLM's compact JSON and safe for any other spacing: a false "may finish" costs one decode, never a wrong
answer.

Two stream formats exist. Chat and completions send `data: {chunk}` events of choices, and the answer ends with
the chunk that finishes its last choice (then `data: [DONE]`). The Responses and Messages APIs send named
events, `event: {type}` then `data: {"type": ...}`, which are relayed whole (the event line included: the
Anthropic SDK dispatches on it), and the answer ends with one final event (`response.completed`,
`message_stop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgspec

RelayedChunk = bytes  # one SSE event as the engine sent it: its data (choices), or its whole text (named events)

# The first chunk of every relayed stream, before the engine's first event: the engine has answered 200, so
# the stream is open. refine sends the client its response headers then, as vLLM itself does, rather than
# with the first token, where the client's work on them would delay that token.
ACCEPTED: RelayedChunk = b""

_FINISH = b'"finish_reason"'
_NOT_FINISHED = b'"finish_reason":null'
NO_CHOICES = b'"choices":[]'
_EMPTY_TEXT = (b'"text":""', b'"content":""')
_DATA = b"\ndata: "

decode = msgspec.json.decode
encode = msgspec.json.encode


@dataclass(frozen=True)
class StreamFormat:
    """How one endpoint streams: choice chunks (`named=False`), or named events with final and token types."""

    named: bool
    final_types: tuple[str, ...] = ()  # named: the event types that end the answer
    token_types: tuple[str, ...] = ()  # named: the event types that carry generated text
    ends_with_done: bool = True  # the stream closes with `data: [DONE]`

    @cached_property
    def _final_marks(self) -> tuple[bytes, ...]:
        return tuple(f'"{t}"'.encode() for t in self.final_types)

    @cached_property
    def _token_marks(self) -> tuple[bytes, ...]:
        return tuple(f'"{t}"'.encode() for t in self.token_types)

    # ---- relayed events (bytes) ------------------------------------------------------------------------

    # Both run once per relayed token: plain loops, no generator expressions.
    def may_finish(self, chunk: RelayedChunk) -> bool:
        """False only when the event ends nothing: no choice finishes in it, or it is not a final event."""
        if not self.named:
            return _FINISH in chunk and _NOT_FINISHED not in chunk
        for mark in self._final_marks:  # noqa: SIM110 (a loop: no generator per token)
            if mark in chunk:
                return True
        return False

    def carries_tokens(self, chunk: RelayedChunk) -> bool:
        """An event with text in it: the ones time-to-first-token and inter-token latency are measured on."""
        if not self.named:
            return NO_CHOICES not in chunk and _EMPTY_TEXT[0] not in chunk and _EMPTY_TEXT[1] not in chunk
        for mark in self._token_marks:  # noqa: SIM110 (a loop: no generator per token)
            if mark in chunk:
                return True
        return False

    def decode_event(self, chunk: RelayedChunk) -> dict[str, Any]:
        """The event's JSON data."""
        return decode(chunk.partition(_DATA)[2] if self.named else chunk)

    def sse(self, chunk: RelayedChunk) -> bytes:
        """A relayed event as the client receives it."""
        return (chunk if self.named else b"data: " + chunk) + b"\n\n"

    # ---- events a policy or refine wrote (dicts) ---------------------------------------------------------

    def encode_event(self, event: dict[str, Any]) -> bytes:
        data = encode(event)
        return (f"event: {event['type']}".encode() + _DATA + data if self.named else b"data: " + data) + b"\n\n"

    def is_final(self, event: dict[str, Any]) -> bool:
        """A named event that ends the answer (choice chunks are judged by `finished_choices`)."""
        return event.get("type") in self.final_types

    def event_carries_tokens(self, event: dict[str, Any]) -> bool:
        if self.named:
            return event.get("type") in self.token_types
        return any(c.get("text") or (c.get("delta") or {}).get("content") for c in event.get("choices") or ())

    def error_event(self, body: dict[str, Any]) -> bytes:
        """A failure in the middle of a stream, as this format's clients read one: OpenAI's error chunk, or
        Anthropic's `error` event (its body is already in Anthropic's shape)."""
        if self.named and body.get("type") == "error":
            return self.encode_event(body)
        return b"data: " + encode(body) + b"\n\n"


CHOICE_CHUNKS = StreamFormat(named=False)
RESPONSE_EVENTS = StreamFormat(
    named=True,
    final_types=("response.completed", "response.incomplete", "response.failed"),
    token_types=("response.output_text.delta",),
    ends_with_done=False,
)
MESSAGE_EVENTS = StreamFormat(
    named=True, final_types=("message_stop",), token_types=("content_block_delta",), ends_with_done=False
)
STREAM_FORMATS = {
    "chat": CHOICE_CHUNKS,
    "completions": CHOICE_CHUNKS,
    "responses": RESPONSE_EVENTS,
    "messages": MESSAGE_EVENTS,
}


def finished_choices(chunk: dict[str, Any]) -> set[int]:
    """The indexes of the choices a decoded chunk finishes."""
    return {c.get("index", 0) for c in chunk.get("choices") or () if c.get("finish_reason")}
