"""One generation request, served: read, choose the policy, check, complete or stream, record.

`GenerationServing` is made per request by the route (openai_api.py) and holds what the request's steps share:
the runtime, the caller's key, the span, the chosen policy and its parameters, the replica it runs on, and the
policy call the answer came from. The route knows no policy's fields: a policy declares its metrics and fills
them in its trace; the serving object turns them into the `refine` block, headers and metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from refine_server.auth import Grant
from refine_server.backend import Backend
from refine_server.disconnect import ClientDisconnected, cancel_on_disconnect
from refine_server.engine_fields import check_engine_fields
from refine_server.errors import APIError, from_policy_error, from_validation_error, invalid_request
from refine_server.front_ends import FrontEnd
from refine_server.gatekeeping.gatekeeper import Ticket
from refine_server.gatekeeping.max_tokens import server_defaults, with_default_max_tokens
from refine_server.policies import LimitExceeded, Policy, PolicyError, PolicyParams, UnknownPolicy
from refine_server.policies.base import PolicyCall, ResolvedPolicy
from refine_server.policies.engine_client import EngineClient
from refine_server.policies.relayed import STREAM_FORMATS, StreamFormat
from refine_server.policies.request import ClientRequest
from refine_server.policies.transport import NO_TRACER
from refine_server.runtime import Runtime
from refine_server.schemas import GenerationRequest, RefineSpec
from refine_server.streaming import SSE_HEADERS, Chunk, ChunkRelay, EventStreamResponse, StreamLatency
from refine_server.tracing import RequestSpan
from refine_server.upstreams import Route

POLICY_HEADER = "x-refine-policy"

log = logging.getLogger(__name__)


class GenerationServing:
    """Serves one request to a generation endpoint; `respond()` once."""

    def __init__(self, request: Request, front: FrontEnd, rt: Runtime, grant: Grant, span: RequestSpan | None):
        self._http = request
        self._front = front
        self._endpoint = front.endpoint
        # Whether the policy's chat answer is written back in another API's shape (set once the policy is known).
        self._translated = False
        self._rt = rt
        self._grant = grant
        self._span = span
        self._started = time.perf_counter()
        self._route = Route(rt.upstreams)
        self._policy_label = "other"  # until the policy is known
        self._calls: list[PolicyCall] = []  # one per replica tried: the last one answers
        self._ticket: Ticket | None = None  # once admitted: the policy's slot, the key's budget, the calls' fields
        self.request: ClientRequest
        self.policy: Policy[Any]
        self.params: PolicyParams
        self.nested: ResolvedPolicy | None = None  # the policy the chosen one's parameters name (auto's escalation)
        self._nested_param = ""  # the field that names it: refine.<parameter>.policy

    async def respond(self) -> Response:
        """The answer, or the error in the API's own format; the request is counted whatever happens."""
        try:
            parsed, body = await self._read_request()
            self.policy, self.params, self.nested = self._choose_policy(parsed.refine)
            self._policy_label = self._rt.metrics.policy_label(self.policy.name)
            self._translated = self._front.translates and not self.policy.relays_request
            request = self._front.translate(parsed, body) if self._translated else self._front.relayed(parsed, body)
            self.request = with_default_max_tokens(request, self._rt.settings.answer_tokens_default())
            if self._span is not None:
                self._span.started(self.request, self.policy.name)
            self._refuse_unhonoured_fields()
            self._ticket = await self._rt.gatekeeper.admit(self.policy.name, self._grant, self._http.receive)
            return await (self._stream() if self.request.stream else self._complete())
        except PolicyError as exc:
            self.finished(exc.status)
            return self._front.error_response(from_policy_error(exc))
        except APIError as exc:
            self.finished(exc.status)
            return self._front.error_response(exc)
        except ClientDisconnected:
            self.finished(499)
            return Response(status_code=499)
        except Exception:
            log.exception("unhandled error serving a %s request", self._endpoint)
            self.finished(500)
            return self._front.error_response(APIError(500, "internal server error", code="internal_error"))

    # ---- the answer ------------------------------------------------------------------------------------------

    async def _complete(self) -> Response:
        async def answer(backend: Backend) -> dict[str, Any]:
            call = self._new_call(backend)
            return await cancel_on_disconnect(self._http.receive, self.policy.complete(call, self.params))

        result = await self._route.run(answer, self._plugin_check())
        if self._span is not None:
            self._span.answered(result)
        if self._translated:
            result = self._front.answer(result, self.request)
        result["refine"] = self.refine_block()
        self.finished(200)
        return Response(msgspec.json.encode(result), media_type="application/json", headers=self._summary_headers())

    async def _stream(self) -> Response:
        """Answers once the stream is open: at the engine's 200 for a relayed stream (`relayed.ACCEPTED`), at the
        first chunk for a policy that writes its own. A backend that refuses the request so yields a real HTTP
        error status, and one that cannot be reached is replaced by another before the client has seen anything
        (and, for a relayed stream, until its first event: `reopen`). The headers go out before the policy's
        work is done: only the policy's name is known by then."""
        first, chunks = await cancel_on_disconnect(
            self._http.receive, self._route.run(self._open_stream, self._plugin_check())
        )
        relay = ChunkRelay(first, chunks, self)
        # What the policy knew before its first chunk (auto's decision), besides its name.
        headers = {**SSE_HEADERS, POLICY_HEADER: self.policy.name, **self._calls[-1].trace.headers}
        return EventStreamResponse(relay.events(), headers=headers)

    async def _open_stream(self, backend: Backend) -> tuple[Chunk | None, AsyncGenerator[Chunk, None]]:
        chunks = self.policy.stream(self._new_call(backend), self.params)
        if self._span is not None:
            chunks = self._span.watch_stream(chunks)
        if self._translated:
            chunks = self._front.events(chunks, self.request)
        try:
            return await anext(chunks, None), chunks
        except BaseException:
            await chunks.aclose()
            raise

    def _new_call(self, backend: Backend) -> PolicyCall:
        assert self._ticket is not None  # admitted before any call
        tracer = NO_TRACER if self._span is None else self._span.engine_calls
        engine = EngineClient(
            backend, self.request, tracer=tracer, fields=self._ticket.fields, pacer=self._ticket.pacer
        )
        call = PolicyCall(self.request, self._ticket.track(engine), nested=self.nested)
        if self.nested is not None:
            call.enter_nested = partial(self._enter_nested, engine)
        self._calls.append(call)
        if self._span is not None:
            self._span.policy_call = call
            self._span.routed(backend.base_url)
        return call

    async def _enter_nested(self, engine: EngineClient) -> bool:
        """The nested policy's slot and, once it is held, its priority on the request's engine calls."""
        assert self._ticket is not None and self.nested is not None
        fields = await self._rt.gatekeeper.admit_nested(self._ticket, self.nested.policy.name, self._grant)
        if fields is None:
            return False
        engine.fields = fields
        return True

    # ---- what the stream's relay asks of its request (streaming.RelayedRequest) -------------------------------

    @property
    def n_choices(self) -> int:
        return self.request.num_choices

    @property
    def stream_format(self) -> StreamFormat:
        return STREAM_FORMATS[self._endpoint]

    def error_body(self, error: APIError) -> dict[str, Any]:
        return self._front.error_body(error)

    def latency(self) -> StreamLatency:
        metrics = self._rt.metrics
        return StreamLatency(
            metrics.ttft.labels(self._policy_label), metrics.itl.labels(self._policy_label), self._started
        )

    def refine_block(self) -> dict[str, Any]:
        """The `refine` block of the answer; the policy's metrics are observed as it is made."""
        call = self._calls[-1]
        self._rt.metrics.observe_policy(self._policy_label, call.trace.values, call.trace.label_values)
        return {
            "policy": self.policy.name,
            "params": self.params.model_dump(mode="json"),
            "trace": call.trace.data,
            **server_defaults(self.request),
        }

    async def reopen(self, failure: APIError) -> tuple[Chunk | None, AsyncGenerator[Chunk, None]]:
        """The stream again on another replica, after `failure` before its first event; or `failure` raised."""
        self._route.leave(failure)
        return await self._route.run(self._open_stream, self._plugin_check())

    def finished(self, status: int) -> None:
        """The request is over with this HTTP status: count it, free its replica and its slot, end its span."""
        self._route.finish()
        if self._ticket is not None:
            self._ticket.finish()
        metrics = self._rt.metrics
        metrics.requests.labels(self._endpoint, self._policy_label, str(status)).inc()
        metrics.e2e_latency.labels(self._endpoint, self._policy_label).observe(time.perf_counter() - self._started)
        if self._span is not None:
            self._span.finished(status)

    # ---- the checks before any engine work ---------------------------------------------------------------

    async def _read_request(self) -> tuple[GenerationRequest, dict[str, Any]]:
        """The request read by its API's model, and its body without `refine`. A 400 for anything refine
        refuses."""
        raw = await self._http.body()
        try:
            body = msgspec.json.decode(raw)
        except ValueError:
            raise invalid_request("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        try:
            parsed = self._front.request_model.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        limit = self._rt.settings.max_tokens_limit
        wanted = parsed.requested_max_tokens()
        if wanted is not None and wanted > limit:
            param = self._front.max_tokens_param(body)
            raise invalid_request(f"{param}={wanted} exceeds this server's limit of {limit}", param)
        check_engine_fields(body, self._rt.open_engine_fields)
        body.pop("refine", None)
        return parsed, body

    def _choose_policy(self, spec: RefineSpec | None) -> tuple[Policy[Any], PolicyParams, ResolvedPolicy | None]:
        """The request's policy, its parameters, and the policy they name (auto's escalation), which is checked
        exactly as a request's own policy is; its errors name the field under `refine.<parameter>`."""
        name = (spec.policy if spec else None) or self._rt.settings.default_policy
        policy, params = self._resolve(name, spec.policy_params() if spec else {}, ("refine",))
        named = policy.nested_policy(params)
        if named is None:
            return policy, params, None
        field, nested_name, nested_params = named
        self._nested_param = f"refine.{field}.policy"
        nested = self._resolve(nested_name, nested_params, ("refine", field), param=self._nested_param)
        return policy, params, ResolvedPolicy(*nested)

    def _resolve(
        self, name: str, raw_params: dict[str, Any], where: tuple[str, ...], param: str = "refine.policy"
    ) -> tuple[Policy[Any], PolicyParams]:
        """A policy by name and its parameters: the key may use it, they validate, they are within the caps."""
        registry = self._rt.registry
        prefix = ".".join(where)
        if name in registry.names:
            self._grant.check_policy(name)
        try:
            return registry.resolve(name, raw_params, self._grant.limits)
        except UnknownPolicy:
            raise invalid_request(
                f"unknown policy {name!r}; this server offers: {', '.join(registry.names)}", param
            ) from None
        except ValidationError as exc:
            raise from_validation_error(exc, prefix=where) from None
        except LimitExceeded as exc:
            raise invalid_request(str(exc), f"{prefix}.{exc.param}") from None

    def _policies(self) -> list[Policy[Any]]:
        """The request's policy and the one its parameters name: both must be able to serve it."""
        return [self.policy, *([self.nested.policy] if self.nested else [])]

    def _refuse_unhonoured_fields(self) -> None:
        for policy in self._policies():
            for field in policy.refuses_fields:
                if self.request.asks_for(field):
                    raise APIError(
                        400,
                        f"policy {policy.name!r} cannot honour {field!r}: send the request without "
                        "it, or choose another policy",
                        param=field,
                        code="unsupported_parameter",
                    )

    def _plugin_check(self) -> Callable[[Backend], Awaitable[None]] | None:
        """What a backend must pass before it gets the request: for an in-engine policy (the request's, or the
        one it may escalate to), a plugin that runs it; None (nothing to await per request) for the others."""
        return self._suits if any(p.needs_engine_plugin for p in self._policies()) else None

    async def _suits(self, backend: Backend) -> None:
        for policy in self._policies():
            if policy.needs_engine_plugin:
                await self._runs_inside(backend, policy)

    async def _runs_inside(self, backend: Backend, policy: Policy[Any]) -> None:
        """A 400 for an in-engine policy on a backend whose plugin cannot run it for this proxy; such a policy
        goes only to a backend whose plugin can."""
        plugin = await backend.plugin(self.request.model)
        where = f"the backend at {backend.base_url}"
        if plugin is None:
            problem = (
                f"{where} does not have refine's engine plugin: pip install refine-server into the vLLM "
                "environment and restart it"
            )
        elif policy.name not in plugin.handshake.policies:
            problem = f"{where} has refine's engine plugin {plugin.handshake.version}, which does not offer it"
        elif plugin.handshake.signature != "ok":
            secret = "no" if plugin.handshake.signature == "no secret" else "another"
            problem = (
                f"{where} has refine's engine plugin but {secret} engine secret: set the same "
                "REFINE_ENGINE_SECRET for refine and in vLLM's environment"
            )
        else:
            return
        raise APIError(
            400,
            f"policy {policy.name!r} runs inside vLLM, but {problem}",
            param="refine.policy" if policy is self.policy else self._nested_param,
            code="engine_plugin_missing",
        )

    def _summary_headers(self) -> dict[str, str]:
        """The policy's name and the counts it recorded that have a header (corrections, rounds, ...)."""
        trace = self._calls[-1].trace
        values = trace.values
        headers = {POLICY_HEADER: self.policy.name, **trace.headers}
        for metric in self.policy.metrics:
            value = values.get(metric.name)
            if metric.header and value is not None:
                headers[metric.header] = str(int(value)) if float(value).is_integer() else str(value)
        return headers
