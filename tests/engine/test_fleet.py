"""refine beside every vLLM replica, behind vLLM's own router (vllm-router), on loopback: every policy through the
router with the official openai client, and a pod killed under load with no request lost before its first byte.

Two "pods": the session's refine (with its embedded engine) and a second one started here (scripts/fleet.py), each
its own refine + vLLM process tree, as deploy/kubernetes/ runs them. Reusing the session's pod saves a third engine
start on a 2-core machine; the pod killed is the one started here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from scripts.fleet import Process, failover_drill, scrape, start_pod, start_router, wait_ready
from tests.conftest import ENGINE_PORT, LOG_DIR, MODEL, REFINE_PORT, RunningServer

PORT_OFFSET = 60  # beside the session's refine and engine, and test_sensor.py's (+50)

pytestmark = pytest.mark.engine

# Each policy at its smallest, as (max_tokens, refine parameters): CyberV with two candidates, RAIN one commit of
# two iterations (about 1.5 s on 2 cores, where 3 tokens of the defaults took 20 s).
POLICIES = {
    "none": (3, {}),
    "srgen": (3, {}),
    "cyberv": (3, {"n": 2, "max_reasoning_tokens": 8, "max_feedback_tokens": 8}),
    "rain": (1, {"max_iterations_per_commit": 2, "min_iterations_per_commit": 1, "max_rollout_tokens": 2}),
}


@pytest.fixture(scope="module")
def fleet(refine_server: RunningServer) -> Iterator[tuple[Process, Process]]:
    """(router, the second pod); the router sends requests to both pods in turn."""
    pod = start_pod("fleet-pod", REFINE_PORT + PORT_OFFSET, ENGINE_PORT + PORT_OFFSET, LOG_DIR)
    router = None
    try:
        wait_ready(pod)
        router = start_router(
            "fleet-router",
            REFINE_PORT + PORT_OFFSET + 1,
            REFINE_PORT + PORT_OFFSET + 2,
            [refine_server.url, pod.url],
            LOG_DIR,
        )
        wait_ready(router, "/health", 60)
        yield router, pod
    finally:
        for server in ([router] if router else []) + [pod]:
            server.stop()


def routed(router: Process) -> dict[str, float]:
    """Requests the router has sent to each pod, by pod URL."""
    assert router.metrics_url
    return {
        labels.split('"')[1]: value
        for labels, value in scrape(router.metrics_url, "vllm_router_processed_requests_total").items()
    }


def test_every_policy_answers_through_the_router_on_both_pods(
    fleet: tuple[Process, Process], refine_server: RunningServer
) -> None:
    router, pod = fleet
    client = OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)
    before = routed(router)
    for policy, (max_tokens, params) in POLICIES.items():
        for _ in range(2):  # round robin: once on each pod
            resp = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "What is 2 + 3?"}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"refine": {"policy": policy, **params}},
            )
            refine = resp.model_extra["refine"]
            assert refine["policy"] == policy and resp.choices[0].message.content, refine
            if policy == "srgen":  # the in-engine trace came back through the pod's own events folder
                assert refine["trace"]["engine_events"] == "reported", refine["trace"]
            if policy == "cyberv":
                assert len(refine["trace"]["candidates"]) == 2, refine["trace"]
            if policy == "rain":
                assert refine["trace"]["commits"], refine["trace"]
    after = routed(router)
    for url in (refine_server.url, pod.url):
        assert after.get(url, 0) - before.get(url, 0) >= len(POLICIES), (before, after)


def test_the_router_answers_the_probes_its_manifest_names(fleet: tuple[Process, Process]) -> None:
    """deploy/kubernetes/base/router.yaml probes the router's own endpoints: the pinned vllm-router serves them."""
    router, _ = fleet
    manifest = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base" / "router.yaml"
    (deployment,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    paths = [container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")]
    assert [httpx.get(router.url + path, timeout=5).status_code for path in paths] == [200, 200], paths


def test_a_pod_killed_under_load_loses_no_request_before_its_first_byte(
    fleet: tuple[Process, Process], refine_server: RunningServer
) -> None:
    router, pod = fleet
    before = routed(router)
    drill = failover_drill(router.url, pod.kill)
    print(drill.summary())
    assert not drill.lost_before_first_byte(), drill.summary()
    after_kill = drill.after_kill()
    assert after_kill and all(o.error is None for o in after_kill), drill.summary()
    # The survivor took the requests: the router sent it at least every one started after the kill.
    after = routed(router)
    assert after[refine_server.url] - before.get(refine_server.url, 0) >= len(after_kill), (before, after)
    # and the dead pod's circuit is open (1) or its health check has failed.
    assert router.metrics_url
    state = scrape(router.metrics_url, "vllm_router_cb_state")
    health = scrape(router.metrics_url, "vllm_router_worker_health")
    key = f'{{worker="{pod.url}"}}'
    assert state.get(key) == 1 or health.get(key) == 0, (state, health)
