"""A stand-in for a vLLM server *without* refine's plugin, for proxy-mechanics unit tests.

It answers like vLLM does (OpenAI JSON, SSE; a list of prompts gets a choice per prompt), ignores
`vllm_xargs` (counting completions and those that carry refine's, as `GET /fake/stats` reports), and can be
told to fail: a prompt of "FAIL_500" gets an HTTP 500, "FAIL_MIDSTREAM" an error event after the first chunk,
"DROP_MIDSTREAM" a connection dropped after the first chunk, "SLOW" its answer after 3 s. "LONG_STREAM" streams
50 tokens, 0.1 s apart; "HOLD_FIRST" streams its first token once the test sets `app.state.release_first`.
/v1/responses and /v1/messages answer in outline as vLLM's do (named events when streaming; an input of
"FAIL_500" fails). A fake
made with `drops_streams=True` answers every stream 200 and drops the connection before its first event.
`GET /fake/traceparents` lists the `traceparent` header of each completion request (null where none came),
`GET /fake/bodies` each generation request's body. A stream asked for its usage (`stream_options.include_usage`)
ends with vLLM's usage chunk (`"choices": []`). `/v1/chat/completions` answers "alpha beta gamma" as a message,
after 3 s where a message contains "SLOW".
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"


async def _completions(request: Request):
    body = await request.json()
    prompt = body.get("prompt")
    stats = request.app.state.stats
    stats["completions"] += 1
    request.app.state.traceparents.append(request.headers.get("traceparent"))
    request.app.state.bodies.append(body)
    if any(key.startswith("refine_") for key in body.get("vllm_xargs") or {}):
        stats["refine_xargs_requests"] += 1
    if prompt == "SLOW":
        await asyncio.sleep(3)
    if prompt == "FAIL_500":
        return JSONResponse({"error": {"message": "engine exploded", "type": "InternalServerError"}}, 500)
    words = [" tok"] * 50 if prompt == "LONG_STREAM" else ["alpha", " beta", " gamma"]
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": MODEL,
                "choices": [{"index": 0, "text": "".join(words), "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
            }
        )

    choices = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else 1

    async def events():
        if request.app.state.drops_streams:
            raise ConnectionResetError("the engine went away")  # after the 200: uvicorn drops the connection
        if prompt == "HOLD_FIRST":
            while not request.app.state.release_first.is_set():
                await asyncio.sleep(0.01)
        for i, word in enumerate(words):
            if prompt == "DROP_MIDSTREAM" and i == 1:
                raise ConnectionResetError("the engine went away")  # uvicorn drops the connection mid-body
            if prompt == "FAIL_MIDSTREAM" and i == 1:
                yield "data: " + json.dumps({"error": {"message": "engine died mid-stream", "code": 500}}) + "\n\n"
                return
            if prompt == "LONG_STREAM" and i:
                await asyncio.sleep(0.1)
            for index in range(choices):
                finish = "stop" if i == len(words) - 1 else None
                chunk = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 0,
                    "model": MODEL,
                    "choices": [{"index": index, "text": word, "finish_reason": finish}],
                }
                # Compact like vLLM's JSON, but for one space that no JSON encoder would write: a relay that
                # decodes and re-encodes a chunk changes its bytes.
                data = json.dumps(chunk, separators=(",", ":")).replace('"created":', '"created": ')
                yield f"data: {data}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": 1,
                "completion_tokens": len(words) * choices,
                "total_tokens": 1 + len(words) * choices,
            }
            yield "data: " + json.dumps({"id": "cmpl-1", "choices": [], "usage": usage}, separators=(",", ":")) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _named(kind: str, data: dict) -> str:
    """A named SSE event as vLLM writes it, with the one space no JSON encoder writes (see `_completions`)."""
    data = json.dumps({"type": kind, **data}, separators=(",", ":"))
    return f"event: {kind}\ndata: " + data.replace('"type":', '"type": ', 1) + "\n\n"


async def _responses(request: Request):
    """vLLM's /v1/responses, in outline: a response object, or its named events."""
    body = await request.json()
    request.app.state.stats["responses"] += 1
    if any(key.startswith("refine_") for key in body.get("vllm_xargs") or {}):
        request.app.state.stats["refine_xargs_requests"] += 1
    if body.get("input") == "FAIL_500":
        return JSONResponse({"error": {"message": "engine exploded", "type": "InternalServerError"}}, 500)
    words = ["alpha", " beta", " gamma"]
    item = {
        "type": "message",
        "id": "msg-1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "".join(words), "annotations": []}],
    }
    response = {
        "id": "resp-1",
        "object": "response",
        "created_at": 0,
        "model": MODEL,
        "status": "completed",
        "output": [item],
        "usage": {"input_tokens": 1, "output_tokens": 3, "total_tokens": 4},
    }
    if not body.get("stream"):
        return JSONResponse(response)

    async def events():
        yield _named("response.created", {"sequence_number": 0, "response": {**response, "output": []}})
        for i, word in enumerate(words):
            yield _named(
                "response.output_text.delta",
                {"sequence_number": i + 1, "item_id": "msg-1", "output_index": 0, "content_index": 0, "delta": word},
            )
        yield _named("response.completed", {"sequence_number": len(words) + 1, "response": response})

    return StreamingResponse(events(), media_type="text/event-stream")


async def _messages(request: Request):
    """vLLM's /v1/messages, in outline: a message, or Anthropic's named events."""
    body = await request.json()
    request.app.state.stats["messages"] += 1
    if any(key.startswith("refine_") for key in body.get("vllm_xargs") or {}):
        request.app.state.stats["refine_xargs_requests"] += 1
    words = ["alpha", " beta", " gamma"]
    message = {
        "id": "msg-1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "".join(words)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 3},
    }
    if not body.get("stream"):
        return JSONResponse(message)

    async def events():
        yield _named("message_start", {"message": {**message, "content": [], "stop_reason": None}})
        yield _named("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        for word in words:
            yield _named("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}})
        yield _named("content_block_stop", {"index": 0})
        yield _named(
            "message_delta",
            {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 3}},
        )
        yield _named("message_stop", {})

    return StreamingResponse(events(), media_type="text/event-stream")


async def _chat(request: Request):
    body = await request.json()
    request.app.state.bodies.append(body)
    if any("SLOW" in str(m.get("content")) for m in body.get("messages") or ()):
        await asyncio.sleep(3)
    return JSONResponse(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "alpha beta gamma"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        }
    )


async def _bodies(request: Request):
    return JSONResponse(request.app.state.bodies)


async def _models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def _health(request: Request):
    return JSONResponse({})


async def _stats(request: Request):
    return JSONResponse(request.app.state.stats)


async def _traceparents(request: Request):
    return JSONResponse(request.app.state.traceparents)


def make_app(drops_streams: bool = False) -> Starlette:
    """A fake vLLM with its own request counts (`GET /fake/stats`)."""
    fake = Starlette(
        routes=[
            Route("/v1/completions", _completions, methods=["POST"]),
            Route("/v1/responses", _responses, methods=["POST"]),
            Route("/v1/messages", _messages, methods=["POST"]),
            Route("/v1/chat/completions", _chat, methods=["POST"]),
            Route("/fake/bodies", _bodies),
            Route("/v1/models", _models),
            Route("/health", _health),
            Route("/fake/stats", _stats),
            Route("/fake/traceparents", _traceparents),
        ]
    )
    fake.state.stats = {"completions": 0, "responses": 0, "messages": 0, "refine_xargs_requests": 0}
    fake.state.traceparents = []
    fake.state.bodies = []
    fake.state.drops_streams = drops_streams
    fake.state.release_first = threading.Event()
    return fake


app = make_app()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_in_thread(asgi_app, port: int | None = None) -> Iterator[str]:
    """Run an ASGI app (its lifespan included) on a loopback port (a free one unless given); yields its URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(asgi_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
