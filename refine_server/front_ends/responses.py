"""The OpenAI Responses API (`POST /v1/responses`, the openai SDK's `client.responses.create`).

A policy that writes its own answer reads the request as chat: `instructions` becomes a system message, `input`
(a text, or message items of text parts) the conversation, `max_output_tokens` the length limit. Its answer
becomes a `response` object with one output message, and its stream the API's events: `response.created`,
`response.in_progress`, the output item and content part opened, `response.output_text.delta` per piece of
text, their `done` events, and `response.completed` (or `response.incomplete` at the length limit), which
carries the `refine` block and the usage (input, output and total tokens: every engine call of the policy).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from refine_server.front_ends.base import FrontEnd, one_answer_request, unsupported
from refine_server.policies.request import ClientRequest
from refine_server.schemas import GenerationRequest, ResponsesRequest
from refine_server.streaming import Chunk

_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesFrontEnd(FrontEnd):
    translates = True

    def __init__(self) -> None:
        super().__init__("responses")

    def max_tokens_param(self, body: dict[str, Any]) -> str:
        return "max_output_tokens"

    def relayed(self, parsed: GenerationRequest, body: dict[str, Any]) -> ClientRequest:
        assert isinstance(parsed, ResponsesRequest)
        return one_answer_request(
            "responses", body, parsed.model, max_tokens=parsed.max_output_tokens, stream=parsed.stream
        )

    def translate(self, parsed: GenerationRequest, body: dict[str, Any]) -> ClientRequest:
        assert isinstance(parsed, ResponsesRequest)
        _refuse(body)
        messages = [{"role": "system", "content": parsed.instructions}] if parsed.instructions else []
        messages += _conversation(parsed.input)
        chat: dict[str, Any] = {"model": parsed.model, "messages": messages}
        for ours, theirs in (
            ("max_output_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("seed", "seed"),
        ):
            if body.get(ours) is not None:
                chat[theirs] = body[ours]
        if parsed.stream:
            chat |= {"stream": True, "stream_options": {"include_usage": True}}
        return one_answer_request(
            "chat", chat, parsed.model, max_tokens=parsed.max_output_tokens, stream=parsed.stream, messages=messages
        )

    def answer(self, result: dict[str, Any], request: ClientRequest) -> dict[str, Any]:
        choice = (result.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        return _response(
            _new_id("resp"),
            request,
            _message_item(_new_id("msg"), text, "completed"),
            choice.get("finish_reason"),
            result.get("usage"),
        )

    def events(self, chunks: AsyncGenerator[Chunk, None], request: ClientRequest) -> AsyncGenerator[Chunk, None]:
        return _ResponseStream(request).events(chunks)


def _refuse(body: dict[str, Any]) -> None:
    """A 400 naming each field a policy that writes its own answer cannot honour."""
    for field in ("tools", "previous_response_id", "background", "conversation", "prompt", "reasoning", "include"):
        if body.get(field):
            raise unsupported(field)
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise unsupported("tool_choice")
    text_format = ((body.get("text") or {}).get("format") or {}).get("type", "text")
    if text_format != "text":
        raise unsupported("text.format")


def _conversation(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages = []
    for i, item in enumerate(given):
        role = _ROLES.get(str(item.get("role")))
        if item.get("type", "message") != "message" or role is None:
            raise unsupported(f"input[{i}]", "only messages of text can be read by this policy")
        content = item.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                    raise unsupported(f"input[{i}].content[{j}]", "this policy reads text parts only")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if not isinstance(content, str):
            raise unsupported(f"input[{i}].content", "a message's content must be text")
        messages.append({"role": role, "content": content})
    return messages


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """The output message; `text` None: opened, no content part yet."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "output_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _response(
    response_id: str,
    request: ClientRequest,
    item: dict[str, Any] | None,
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    status: str | None = None,
) -> dict[str, Any]:
    incomplete = finish_reason == "length"
    body = request.body
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": request.model,
        "status": status or ("incomplete" if incomplete else "completed"),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete and not status else None,
        "error": None,
        "instructions": None,
        "metadata": {},
        "output": [item] if item else [],
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_output_tokens": request.max_tokens,
        "text": {"format": {"type": "text"}},
        "usage": _usage(usage),
    }


class _ResponseStream:
    """A policy's chat chunks as the Responses API's events, numbered in order."""

    def __init__(self, request: ClientRequest):
        self._request = request
        self._id = _new_id("resp")
        self._item_id = _new_id("msg")
        self._sequence = 0

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    async def events(self, chunks: AsyncGenerator[Chunk, None]) -> AsyncGenerator[Chunk, None]:
        text: list[str] = []
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        opened = False
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        async for chunk in chunks:
            if isinstance(chunk, bytes):  # a policy that relays: not translated (never reached through here)
                continue
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                if not opened:  # after the policy's first chunk: a refusal before it is still an HTTP error
                    opened = True
                    for event in self._opening():
                        yield event
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    yield self._event("response.output_text.delta", **where, delta=piece, logprobs=[])
                finish_reason = choice.get("finish_reason") or finish_reason
        if not opened:
            for event in self._opening():
                yield event
        whole = "".join(text)
        part = {"type": "output_text", "text": whole, "annotations": [], "logprobs": []}
        yield self._event("response.output_text.done", **where, text=whole, logprobs=[])
        yield self._event("response.content_part.done", **where, part=part)
        item = _message_item(self._item_id, whole, "completed")
        yield self._event("response.output_item.done", output_index=0, item=item)
        final = _response(self._id, self._request, item, finish_reason, usage)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield self._event(kind, response=final)

    def _opening(self) -> list[dict[str, Any]]:
        started = _response(self._id, self._request, None, None, None, status="in_progress")
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
            self._event(
                "response.output_item.added", output_index=0, item=_message_item(self._item_id, None, "in_progress")
            ),
            self._event(
                "response.content_part.added", item_id=self._item_id, output_index=0, content_index=0, part=part
            ),
        ]
