"""A stand-in for vLLM's OpenAI server that costs next to nothing, so a bench in front of it measures the proxy.

Plain ASGI (no FastAPI) with precomputed SSE lines: the stand-in should spend as little CPU per token as a
Python server can, because it shares the machine with the proxy under test. It answers what refine needs in
external mode: `GET /health`, `GET /v1/models` (one model), and `POST /v1/completions`,
`/v1/chat/completions`, `/v1/responses` and `/v1/messages`, streaming or not (the last two in outline: their
named events, one text delta per token). A stream sends `min(--tokens, max_tokens)` events " tok", one every
`--interval-ms`, shaped as vLLM 0.32 (the version in .venv) shapes them (its `model_dump_json(exclude_unset=True)`
output, fields in its order), the last with finish_reason "length", then the usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. Like a vLLM without refine's plugin, it ignores
`vllm_xargs`.

    .venv/bin/python bench/standin_upstream.py --port 9100 [--model standin] [--tokens 64] [--interval-ms 5]

`app(model, tokens, interval_ms)` builds the ASGI callable for use from other code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

TOKEN = " tok"
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))  # pydantic's model_dump_json is compact too


def _event(head: str, choices: str, tail: str = "") -> bytes:
    return f'data: {head},"choices":[{choices}]{tail}}}\n\n'.encode()


def app(model: str = "standin", tokens: int = 64, interval_ms: float = 5.0) -> ASGIApp:
    models = _dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "vllm",
                    "root": model,
                    "parent": None,
                    "max_model_len": 8192,
                    "permission": [],
                }
            ],
        }
    ).encode()
    interval = interval_ms / 1000

    async def respond(send: Callable[[Message], Awaitable[None]], status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def generate(send: Callable[[Message], Awaitable[None]], chat: bool, body: dict[str, Any]) -> None:
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        n = min(tokens, wanted) if isinstance(wanted, int) and wanted > 0 else tokens
        prompt_tokens = max(1, len(_dumps(body.get("messages") if chat else body.get("prompt"))) // 4)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": body.get("model", model)}

        if not body.get("stream"):
            await asyncio.sleep(n * interval)  # the whole generation, as vLLM would take it
            text = TOKEN * n
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            )
            choice |= {"logprobs": None, "finish_reason": "length", "stop_reason": None}
            return await respond(send, 200, _dumps(head | {"choices": [choice], "usage": usage}).encode())

        if chat:
            head["object"] = "chat.completion.chunk"
        prefix = _dumps(head)[:-1]  # every chunk of one stream starts the same; only the choice differs
        if chat:
            first = _event(
                prefix,
                '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
                tail=',"prompt_token_ids":null,"prompt_text":null',
            )
            middle = _event(
                prefix,
                f'{{"index":0,"delta":{{"content":"{TOKEN}"}},"logprobs":null,"finish_reason":null,"token_ids":null}}',
            )
            last = _event(
                prefix,
                f'{{"index":0,"delta":{{"content":"{TOKEN}"}},"logprobs":null,'
                '"finish_reason":"length","stop_reason":null,"token_ids":null}',
            )
        else:
            first = b""
            choice = (
                '{{"index":0,"text":"{t}","logprobs":null,"finish_reason":{f},"stop_reason":null,'
                '"prompt_token_ids":null,"token_ids":null}}'
            )
            middle = _event(prefix, choice.format(t=TOKEN, f="null"))
            last = _event(prefix, choice.format(t=TOKEN, f='"length"'))

        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        loop = asyncio.get_running_loop()
        started = loop.time()
        for k in range(1, n + 1):
            # A fixed schedule, not sleep(interval) per token: a late token does not push back the others.
            delay = started + k * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": last if k == n else middle, "more_body": True})
        tail = b""
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = f'data: {prefix},"choices":[],"usage":{_dumps(usage)}}}\n\n'.encode()
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    async def generate_named(send: Callable[[Message], Awaitable[None]], api: str, body: dict[str, Any]) -> None:
        """The Responses or Messages API: named events `event: {type}` / `data: {...}`, as vLLM writes them."""
        wanted = body.get("max_output_tokens") if api == "responses" else body.get("max_tokens")
        n = min(tokens, wanted) if isinstance(wanted, int) and wanted > 0 else tokens
        prompt_tokens = max(1, len(_dumps(body.get("input") or body.get("messages"))) // 4)
        text = TOKEN * n
        if api == "responses":
            item = {
                "type": "message",
                "id": "msg_" + uuid.uuid4().hex,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
            answer = {
                "id": "resp_" + uuid.uuid4().hex,
                "object": "response",
                "created_at": int(time.time()),
                "model": body.get("model", model),
                "status": "completed",
                "output": [item],
                "usage": {"input_tokens": prompt_tokens, "output_tokens": n, "total_tokens": prompt_tokens + n},
            }
            delta = {
                "type": "response.output_text.delta",
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "delta": TOKEN,
            }
            opening = [{"type": "response.created", "response": answer | {"status": "in_progress", "output": []}}]
            closing = [{"type": "response.completed", "response": answer}]
        else:
            answer = {
                "id": "msg_" + uuid.uuid4().hex,
                "type": "message",
                "role": "assistant",
                "model": body.get("model", model),
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens",
                "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": n},
            }
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TOKEN}}
            opening = [
                {"type": "message_start", "message": answer | {"content": [], "stop_reason": None}},
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ]
            closing = [
                {"type": "content_block_stop", "index": 0},
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": {"output_tokens": n},
                },
                {"type": "message_stop"},
            ]
        if not body.get("stream"):
            await asyncio.sleep(n * interval)
            return await respond(send, 200, _dumps(answer).encode())

        def named(event: dict[str, Any]) -> bytes:
            return f"event: {event['type']}\ndata: {_dumps(event)}\n\n".encode()

        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": b"".join(map(named, opening)), "more_body": True})
        middle = named(delta)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for k in range(1, n + 1):
            delay = started + k * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": middle, "more_body": True})
        await send({"type": "http.response.body", "body": b"".join(map(named, closing))})

    async def asgi(
        scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] == "lifespan":  # nothing to set up: acknowledge start-up, then shut-down
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            return await send({"type": "lifespan.shutdown.complete"})
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            return await respond(send, 200, b"")
        if method == "GET" and path == "/v1/models":
            return await respond(send, 200, models)
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"):
            raw = b""
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if not message.get("more_body"):
                    break
            body = json.loads(raw or b"{}")
            if path in ("/v1/responses", "/v1/messages"):
                return await generate_named(send, path.removeprefix("/v1/"), body)
            return await generate(send, path == "/v1/chat/completions", body)
        await respond(send, 404, b'{"detail":"Not Found"}')

    return asgi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--model", default="standin")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer (a smaller max_tokens wins)")
    ap.add_argument("--interval-ms", type=float, default=5.0, help="time between two streamed tokens")
    args = ap.parse_args()

    import uvicorn

    # No access log: one line per request would cost more CPU than answering it.
    uvicorn.run(
        app(args.model, args.tokens, args.interval_ms),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
