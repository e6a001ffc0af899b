"""refine's Prometheus metrics, kept in a registry owned by the app (not prometheus-client's global one).

Every label comes from a closed set: endpoints refine serves, registered policy names (anything else is
"other"), HTTP status codes. No request ids, prompts or model paths ever become labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Latencies from a few ms (proxy overhead, one CPU decode step) to minutes (long searches on a CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_COUNT_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, policy_names: list[str]):
        self.registry = CollectorRegistry(auto_describe=True)
        self._policies = frozenset(policy_names)
        r = self.registry
        self.requests = Counter(
            "refine_requests", "Requests served, by endpoint, policy and HTTP status",
            ["endpoint", "policy", "status"], registry=r,
        )
        self.e2e_latency = Histogram(
            "refine_request_duration_seconds", "End-to-end request latency as refine sees it",
            ["endpoint", "policy"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "refine_time_to_first_token_seconds", "Time from request to the first streamed token",
            ["policy"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "refine_inter_token_latency_seconds", "Time between consecutive streamed chunks that carry tokens",
            ["policy"], buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.correction_time = Histogram(
            "refine_correction_seconds", "Time a policy spent correcting, per request",
            ["policy"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.corrections = Histogram(
            "refine_corrections_per_request", "Corrections a policy made in one request",
            ["policy"], buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89), registry=r,
        )
        self.rounds = Histogram(
            "refine_rounds_per_request", "Rounds of generation a policy ran for one request (CyberV: 1 or 2)",
            ["policy"], buckets=(1, 2, 3, 5, 8), registry=r,
        )
        self.extra_tokens = Counter(
            "refine_extra_tokens", "Tokens a policy generated beyond the answers it returned",
            ["policy"], registry=r,
        )
        self.search_iterations = Histogram(
            "refine_search_iterations_per_request", "Search iterations a searching policy (RAIN) ran for one request",
            ["policy"], buckets=_COUNT_BUCKETS, registry=r,
        )
        self.rewinds = Histogram(
            "refine_rewinds_per_request",
            "Search iterations whose explored tokens were rewound for good (not under the committed set)",
            ["policy"], buckets=_COUNT_BUCKETS, registry=r,
        )
        self.engine_calls = Histogram(
            "refine_engine_calls_per_request", "Generation calls to the backend for one request (searching policies)",
            ["policy"], buckets=_COUNT_BUCKETS, registry=r,
        )
        self.upstream_latency = Histogram(
            "refine_upstream_request_duration_seconds",
            "Backend latency: whole call when not streaming, time to response headers when streaming",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "refine_upstream_errors", "Failed backend calls, by endpoint and HTTP status or transport failure",
            ["endpoint", "status"], registry=r,
        )
        self.engine_restarts = Counter(
            "refine_engine_restarts", "Times the embedded vLLM server was restarted after it died", registry=r,
        )

    def policy_label(self, name: str) -> str:
        return name if name in self._policies else "other"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
