"""The Grafana dashboard (docker/grafana) asks only for metrics that exist: refine's, as its registry defines
them, and vLLM's, as the installed vLLM's source defines them. A renamed metric fails here, not as an empty
panel in production."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from refine_server.gatekeeping.key_budgets import KeyMetrics
from refine_server.gatekeeping.policy_slots import AdmissionMetrics
from refine_server.metrics import Metrics
from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry

REPO = Path(__file__).resolve().parents[3]
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "refine.json"

# The sample names prometheus-client exposes for a family of each type.
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, Grafana's $__rate_interval among them
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\b\d[\w.]*", "", expr)  # numbers and durations (0.95, 5m)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        is_function = expr[match.end() :].lstrip().startswith("(")
        if not is_function and match.group() not in _NOT_METRICS:
            names.add(match.group())
    return names


def _samples(families: list[tuple[str, str]]) -> set[str]:
    return {name + suffix for name, kind in families for suffix in _SUFFIXES[kind]}


def refine_samples() -> set[str]:
    """Every family refine's registry holds, as the app builds it: the policies' and the server's, admission's
    and the key budgets' included."""
    metrics = Metrics(PolicyRegistry(BUILTIN_POLICIES).metrics())
    AdmissionMetrics(metrics.registry)
    KeyMetrics(metrics.registry)
    return _samples([(family.name, family.type) for family in metrics.registry.collect()])


def vllm_samples() -> set[str]:
    """vLLM's metric families, read from the source of the installed vLLM (its Prometheus stat logger)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text()
    families = re.findall(r'_(counter|gauge|histogram)_cls\(\s*name="(vllm:\w+)"', source)
    assert len(families) > 20, "vLLM's logger no longer declares its metrics the way this test reads them"
    return _samples([(name, kind) for kind, name in families])


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict[str, Any]) -> list[str]:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    # A variable's query is Grafana's label_values(METRIC, LABEL): the metric is what must exist.
    variables = [
        re.fullmatch(r"label_values\((.+),\s*\w+\)", v["query"]["query"]).group(1)
        for v in dashboard["templating"]["list"]
    ]
    return exprs + variables


def test_metric_names_finds_every_metric_of_a_query_and_nothing_else() -> None:
    expr = (
        'sum by (policy, le) (rate(refine_nope_bucket{policy=~"$policy", status!="200"}[$__rate_interval])) '
        "/ on (policy) group_left vllm:made_up offset 5m"
    )
    assert metric_names(expr) == {"refine_nope_bucket", "vllm:made_up"}


def test_every_dashboard_query_names_only_metrics_refine_or_vllm_export() -> None:
    known = refine_samples() | vllm_samples()
    for expr in _queries(_dashboard()):
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{sorted(names - known)} in {expr}"


def test_the_dashboard_shows_what_operators_ask_for() -> None:
    used = set().union(*(metric_names(e) for e in _queries(_dashboard())))
    for wanted in (
        "refine_requests_total",
        "refine_request_duration_seconds_bucket",
        "refine_time_to_first_token_seconds_bucket",
        "refine_inter_token_latency_seconds_bucket",
        "refine_corrections_per_request_sum",
        "refine_rounds_per_request_sum",
        "refine_search_iterations_per_request_sum",
        "refine_upstream_healthy",
        "refine_build_info",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert wanted in used, wanted


def test_compose_provisions_the_data_source_the_panels_name_and_mounts_the_dashboard() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":") for volume in grafana["volumes"])
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "refine.yml").read_text())
    assert mounts["./docker/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"

    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {source["uid"]}
