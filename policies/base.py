"""What a policy is: its parameters (a pydantic model), its server-side limits, its algorithm, its trace and
the metrics it reports.

A policy receives one client request (`ClientRequest`, typed, `refine` object removed) and an `EngineClient`
to call vLLM through, and answers: either as one OpenAI response (`complete`) or as a stream of OpenAI chunks
(`stream`). It records what it did in its `Trace`: `data` goes back to the client in the response's `refine`
block, and the values of the metrics the policy declares go to Prometheus. A request the policy cannot serve
is a `PolicyRequestError` (the client receives a 400), one the server cannot run now a
`PolicyUnavailable` (503).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

# The parameter models live beside the engine plugin, which validates in-engine policies' parameters too;
# policies import them from here.
from refine_server.contract.params import LimitExceeded, PolicyLimits, PolicyParams, enforce_limits  # noqa: F401

if TYPE_CHECKING:
    from refine_server.policies.engine_client import EngineClient
    from refine_server.policies.request import ClientRequest


class PolicyError(Exception):
    """A policy cannot answer this request; the client receives `status` with the message."""

    status: ClassVar[int] = 400

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class PolicyRequestError(PolicyError):
    """The client's request is one this policy cannot serve (a 400 naming `param`)."""


class PolicyUnavailable(PolicyError):
    """This server cannot run the policy at the moment (a missing optional dependency, say): a 503."""

    status = 503


@dataclass(frozen=True)
class PolicyMetric:
    """A Prometheus metric a policy reports once per request, labelled by policy. Policies that declare the
    same name share the metric, so they must declare it identically."""

    name: str
    help: str
    kind: Literal["histogram", "counter"]
    buckets: tuple[float, ...] = ()
    unset: float | None = None  # observed when a request's trace leaves the metric unset (None: not observed)
    # A response header that carries the request's value too (non-streaming responses), for clients that drop
    # the body's unknown `refine` block (LangChain keeps only the fields it knows; it can keep headers).
    header: str | None = None
    # Labels besides `policy`, each from a closed set the policy names (never request data). A labelled metric
    # is observed only when the trace records it with its label values (`unset` must be None).
    labels: tuple[str, ...] = ()


# Latencies from a few ms (proxy overhead, one CPU decode step) to minutes (long searches on a CPU); refine's
# own latency histograms use the same buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_COUNTS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

CORRECTION_SECONDS = PolicyMetric(
    "refine_correction_seconds", "Time a policy spent correcting, per request", "histogram", LATENCY_BUCKETS, unset=0.0
)
CORRECTIONS = PolicyMetric(
    "refine_corrections_per_request",
    "Corrections a policy made in one request",
    "histogram",
    (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89),
    header="x-refine-corrections",
)
ROUNDS = PolicyMetric(
    "refine_rounds_per_request",
    "Rounds of generation a policy ran for one request (CyberV: 1 or 2)",
    "histogram",
    (1, 2, 3, 5, 8),
    header="x-refine-rounds",
)
EXTRA_TOKENS = PolicyMetric(
    "refine_extra_tokens", "Tokens a policy generated beyond the answers it returned", "counter"
)
SEARCH_ITERATIONS = PolicyMetric(
    "refine_search_iterations_per_request",
    "Search iterations a searching policy (RAIN) ran for one request",
    "histogram",
    _COUNTS,
    header="x-refine-search-iterations",
)
REWINDS = PolicyMetric(
    "refine_rewinds_per_request",
    "Search iterations whose explored tokens were rewound for good (not under the committed set)",
    "histogram",
    _COUNTS,
)
ENGINE_CALLS = PolicyMetric(
    "refine_engine_calls_per_request",
    "Generation calls to the backend for one request (searching policies)",
    "histogram",
    _COUNTS,
    header="x-refine-engine-calls",
)


# DeepConf's (the `deepconf` policy, CyberV's `confidence_stop`): sampled traces, those its confidence stop
# ended early, and the tokens that saved (an estimate: what the stopped and the undrawn traces would have cost).
TRACES = PolicyMetric(
    "refine_traces_per_request",
    "Sampled traces a voting policy drew for one request",
    "histogram",
    (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    header="x-refine-traces",
)
STOPPED_TRACES = PolicyMetric(
    "refine_stopped_traces_per_request",
    "Traces the confidence stop ended early in one request",
    "histogram",
    (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
TOKENS_SAVED = PolicyMetric(
    "refine_tokens_saved_estimate",
    "Completion tokens a confidence stop saved (estimated from the traces that ran in full)",
    "counter",
)


@dataclass
class Trace:
    """What a policy did for one request: `data` for the client, `values` of its declared metrics (with the
    values of their extra labels), and `headers` of its own for the response (`x-refine-...`)."""

    data: dict[str, Any] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    label_values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def record(self, metric: PolicyMetric, value: float | None, *labels: str) -> None:
        """Set one metric's value for this request (None: the policy could not tell; not observed), with the
        values of the metric's extra `labels`, in order."""
        if len(labels) != len(metric.labels):
            raise ValueError(f"{metric.name} takes labels {metric.labels}, given {labels}")
        if value is None:
            self.values.pop(metric.name, None)
            self.label_values.pop(metric.name, None)
        else:
            self.values[metric.name] = value
            if labels:
                self.label_values[metric.name] = labels


@dataclass(frozen=True)
class ResolvedPolicy:
    """A policy named inside another's parameters (`auto`'s `escalate`), with its parameters validated and
    capped by the server exactly as a request's own policy is."""

    policy: Policy[Any]
    params: PolicyParams


@dataclass
class PolicyCall:
    request: ClientRequest
    engine: EngineClient
    trace: Trace = field(default_factory=Trace)
    nested: ResolvedPolicy | None = None  # the policy this one's parameters name (`Policy.nested_policy`)
    # Before the nested policy runs: waits, as a request of it would, for a slot of it, after which the engine's
    # calls carry its priority. False when no slot came in time (the caller answers without it). None where
    # nothing admits requests (a policy driven directly, as in unit tests): the nested policy runs at once.
    enter_nested: Callable[[], Awaitable[bool]] | None = None


P = TypeVar("P", bound=PolicyParams)


class Policy(ABC, Generic[P]):
    name: ClassVar[str]
    # The model that validates the P `complete` and `stream` receive (typed by P's bound: a ClassVar cannot name P).
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    Limits: ClassVar[type[PolicyLimits]] = PolicyLimits
    # True when the policy runs inside vLLM: refine refuses it on a backend without refine's engine plugin.
    needs_engine_plugin: ClassVar[bool] = False
    # True when the policy answers with the engine's own answer to the client's request (`relay`, perhaps with
    # engine arguments added): it then serves every endpoint vLLM serves, as sent. False: the policy writes its
    # own answer from chat or completions requests, and refine translates other APIs' requests for it.
    relays_request: ClassVar[bool] = False
    # What the policy reports per request; refine creates these metrics at start and observes them from the
    # trace. Every policy reports its correction time, so dashboards can compare policies on it.
    metrics: ClassVar[tuple[PolicyMetric, ...]] = (CORRECTION_SECONDS,)
    # Request fields the policy cannot honour (it writes its own answer, without tools or logprobs, say): a
    # request that asks for one is refused with a 400 naming the field before the policy runs, never ignored.
    refuses_fields: ClassVar[tuple[str, ...]] = ()
    # True when the policy has something to load before its first request (`warm_up`): a model, tokenizers.
    warms_up: ClassVar[bool] = False

    def nested_policy(self, params: P) -> tuple[str, str, dict[str, Any]] | None:
        """A policy these parameters name for this policy to run (`auto`'s escalation): the parameter's name,
        the policy's name and its raw parameters. The server resolves it as it resolves a request's own policy
        (the key's permission, validation, caps, the plugin, refused fields) and hands it over as
        `PolicyCall.nested`. None: no such policy."""
        return None

    async def warm_up(self, served_models: list[dict[str, Any]]) -> None:
        """Load what the policy needs (for the backend's `served_models`, its /v1/models entries), so the first
        request does not wait for it. Called once in the background when a backend is ready, where `warms_up`."""

    @abstractmethod
    async def complete(self, call: PolicyCall, params: P) -> dict[str, Any]:
        """Answer a non-streaming request with one OpenAI response body."""

    @abstractmethod
    def stream(self, call: PolicyCall, params: P) -> AsyncGenerator[dict[str, Any] | bytes, None]:
        """Answer a streaming request with OpenAI chunk bodies, in order, as soon as each is known: dicts the
        policy wrote, or the engine's chunks as `call.engine.relay_stream` gave them (JSON bytes), which
        refine sends on without decoding them."""
