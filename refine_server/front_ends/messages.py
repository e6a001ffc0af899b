"""Anthropic's Messages API (`POST /v1/messages`, the anthropic SDK's `client.messages.create` and `.stream`).

A policy that writes its own answer reads the request as chat: `system` (a text, or text blocks) becomes a
system message, `messages` (texts, or text blocks) the conversation, `max_tokens` the length limit and
`stop_sequences` the stops. Its answer becomes a `message` with one text block, and its stream Anthropic's
events: `message_start`, `content_block_start`, a `content_block_delta` per piece of text,
`content_block_stop`, `message_delta` (the stop reason and usage) and `message_stop`, which carries the `refine`
block. Errors, on this endpoint only, are Anthropic's: `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any

from refine_server.errors import APIError
from refine_server.front_ends.base import FrontEnd, one_answer_request, unsupported
from refine_server.policies.request import ClientRequest
from refine_server.schemas import GenerationRequest, MessagesRequest
from refine_server.streaming import Chunk

# Anthropic's error types by HTTP status (its SDK raises by status; the type names the kind).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


class MessagesFrontEnd(FrontEnd):
    translates = True

    def __init__(self) -> None:
        super().__init__("messages")

    def max_tokens_param(self, body: dict[str, Any]) -> str:
        return "max_tokens"

    def relayed(self, parsed: GenerationRequest, body: dict[str, Any]) -> ClientRequest:
        assert isinstance(parsed, MessagesRequest)
        return one_answer_request(
            "messages",
            body,
            parsed.model,
            max_tokens=parsed.max_tokens,
            stream=parsed.stream,
            stop=list(parsed.stop_sequences or ()),
        )

    def translate(self, parsed: GenerationRequest, body: dict[str, Any]) -> ClientRequest:
        assert isinstance(parsed, MessagesRequest)
        for field in ("tools", "tool_choice"):
            if body.get(field):
                raise unsupported(field)
        if (body.get("thinking") or {}).get("type", "disabled") != "disabled":
            raise unsupported("thinking")
        messages = [{"role": "system", "content": _text(parsed.system, "system")}] if parsed.system else []
        for i, message in enumerate(parsed.messages):
            messages.append({"role": message.role, "content": _text(message.content, f"messages[{i}]")})
        stop = list(parsed.stop_sequences or ())
        chat: dict[str, Any] = {"model": parsed.model, "messages": messages, "max_tokens": parsed.max_tokens}
        for field in ("temperature", "top_p", "top_k", "seed"):
            if body.get(field) is not None:
                chat[field] = body[field]
        if stop:
            chat["stop"] = stop
        if parsed.stream:
            chat |= {"stream": True, "stream_options": {"include_usage": True}}
        return one_answer_request(
            "chat", chat, parsed.model, max_tokens=parsed.max_tokens, stream=parsed.stream, stop=stop, messages=messages
        )

    def answer(self, result: dict[str, Any], request: ClientRequest) -> dict[str, Any]:
        choice = (result.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        reason, sequence = _stop(choice)
        return {
            "id": _new_id(),
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": _usage(result.get("usage")),
        }

    def events(self, chunks: AsyncGenerator[Chunk, None], request: ClientRequest) -> AsyncGenerator[Chunk, None]:
        return _message_stream(chunks, request)

    def error_body(self, error: APIError) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}


def _text(content: Any, where: str) -> str:
    """A text, or a list of text blocks, as one text; a 400 naming any other block."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise unsupported(f"{where}.content", "content must be text or text blocks")
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise unsupported(f"{where}.content[{j}]", "this policy reads text blocks only")
        parts.append(str(block.get("text", "")))
    return "".join(parts)


def _new_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _stop(choice: dict[str, Any]) -> tuple[str, str | None]:
    """Anthropic's stop reason, and the stop sequence that ended the text (vLLM names it in `stop_reason`)."""
    matched = choice.get("stop_reason")
    if isinstance(matched, str):
        return "stop_sequence", matched
    return _STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"), None


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    return {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}


async def _message_stream(chunks: AsyncGenerator[Chunk, None], request: ClientRequest) -> AsyncGenerator[Chunk, None]:
    """A policy's chat chunks as Anthropic's stream events."""
    opened = False
    finishing: dict[str, Any] = {}
    usage: dict[str, Any] | None = None
    async for chunk in chunks:
        if isinstance(chunk, bytes):  # a policy that relays: not translated (never reached through here)
            continue
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            if not opened:  # after the policy's first chunk: a refusal before it is still an HTTP error
                opened = True
                for event in _opening(request):
                    yield event
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
            if choice.get("finish_reason"):
                finishing = choice
    if not opened:
        for event in _opening(request):
            yield event
    reason, sequence = _stop(finishing)
    yield {"type": "content_block_stop", "index": 0}
    yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": _usage(usage)}
    yield {"type": "message_stop"}


def _opening(request: ClientRequest) -> list[dict[str, Any]]:
    message: dict[str, Any] = {
        "id": _new_id(),
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    return [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
