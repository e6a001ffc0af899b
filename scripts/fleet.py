"""A fleet on one machine: refine "pods" (refine with its embedded vLLM, each on its own loopback ports) behind
vllm-router, laid out as deploy/kubernetes/ lays them out on a cluster, and the failover drill the README reports.

    .venv/bin/python scripts/fleet.py                  # two pods + the router on http://127.0.0.1:8000, until Ctrl-C
    .venv/bin/python scripts/fleet.py --drill          # ... then send load, kill one pod, report what the clients saw
    .venv/bin/python scripts/fleet.py --port 48000     # pods on 48001.., engines on 48101.., router metrics 48090

Everything listens on 127.0.0.1 only. tests/engine/test_fleet.py runs the drill with the test session's server as
one of the pods.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from openai import OpenAI

from refine_server.models.catalog import DEFAULT_MODEL

# Fast failover on loopback: health checks every second, the circuit opens after 2 failed calls (the defaults,
# 60 s and 10, suit a cluster). The router retries a failed call on another pod (its default: up to 5 tries).
ROUTER_FLAGS = [
    "--policy",
    "round_robin",
    "--health-check-endpoint",
    "/readyz",
    "--health-check-interval-secs",
    "1",
    "--health-failure-threshold",
    "2",
    "--cb-failure-threshold",
    "2",
    "--cb-timeout-duration-secs",
    "30",
    "--worker-startup-check-interval",
    "1",
    "--retry-initial-backoff-ms",
    "20",
]


@dataclass
class Process:
    """A server this script started, in its own process group, logging to a file."""

    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    metrics_url: str | None = None  # the router's Prometheus endpoint

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """A pod dying at once: SIGKILL to refine (its engine follows: it gets SIGTERM when its parent dies)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def _spawn(name: str, url: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )
    return Process(name, url, proc, log_path)


def start_pod(name: str, port: int, engine_port: int, log_dir: Path, env: dict[str, str] | None = None) -> Process:
    """refine in embedded mode: the pod's two containers as one process tree (refine and the vLLM it supervises),
    with an events folder of its own (the pod's emptyDir). `env` reaches the engine too."""
    cmd = [
        sys.executable,
        "-m",
        "refine_server",
        "--port",
        str(port),
        "--engine-port",
        str(engine_port),
        "--engine-max-model-len",
        "1024",
        "--engine-events-dir",
        str(log_dir / f"{name}-events"),
    ]
    return _spawn(name, f"http://127.0.0.1:{port}", cmd, log_dir, env)


def start_tier(name: str, port: int, backend_url: str, log_dir: Path) -> Process:
    """refine in external mode with one backend (a router): the separate refine tier, with no engine of its own."""
    cmd = [sys.executable, "-m", "refine_server", "--port", str(port), "--backend-url", backend_url]
    return _spawn(name, f"http://127.0.0.1:{port}", cmd, log_dir)


def start_router(
    name: str, port: int, metrics_port: int, worker_urls: list[str], log_dir: Path, *extra: str
) -> Process:
    """vllm-router with ROUTER_FLAGS; `extra` flags come after them, so they win (--policy cache_aware)."""
    cmd = [
        str(Path(sys.executable).with_name("vllm-router")),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--worker-urls",
        *worker_urls,
        *ROUTER_FLAGS,
        *extra,
    ]
    server = _spawn(name, f"http://127.0.0.1:{port}", cmd, log_dir)
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return server


def wait_ready(server: Process, path: str = "/readyz", timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited early:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} not ready after {timeout_s} s:\n{server.log_tail()}")


def scrape(url: str, name: str) -> dict[str, float]:
    """One Prometheus metric's samples by label set (the router's exposition has blank lines between them)."""
    text = httpx.get(url, timeout=5).text
    return {
        labels: float(value) for labels, value in re.findall(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M)
    }


# ---- the drill -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One client request through the router. `headers_at`: when its response began (the openai client returns
    a stream once the status and headers are in), None if it never did."""

    started: float
    headers_at: float | None = None
    finished: float | None = None
    error: str | None = None


@dataclass
class Drill:
    killed_at: float
    outcomes: list[Outcome] = field(default_factory=list)

    def lost_before_first_byte(self) -> list[Outcome]:
        """Requests that failed without their response ever starting: what the router's failover must prevent."""
        return [o for o in self.outcomes if o.error and o.headers_at is None]

    def cut_mid_stream(self) -> list[Outcome]:
        """Streams under way on the pod when it died: the client had headers (maybe tokens) and got an error."""
        return [o for o in self.outcomes if o.error and o.headers_at is not None]

    def after_kill(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= self.killed_at]

    def summary(self) -> str:
        after = self.after_kill()
        ok_after = [o for o in after if o.error is None]
        slowest = max((o.finished - o.started for o in ok_after), default=0.0)  # type: ignore[operator]
        return (
            f"{len(self.outcomes)} streamed requests, {len(after)} started after the kill: "
            f"{len(ok_after)} succeeded (slowest {slowest:.2f} s); "
            f"lost before their first byte: {len(self.lost_before_first_byte())}; "
            f"cut mid-stream: {len(self.cut_mid_stream())}"
        )


def _client_loop(client: OpenAI, stop: threading.Event, outcomes: list[Outcome], lock: threading.Lock) -> None:
    while not stop.is_set():
        outcome = Outcome(time.monotonic())
        try:
            stream = client.chat.completions.create(
                model=DEFAULT_MODEL.name,
                messages=[{"role": "user", "content": "Count to five."}],
                max_tokens=6,
                temperature=0,
                stream=True,
                extra_body={"refine": {"policy": "none"}},
            )
            outcome.headers_at = time.monotonic()
            for _ in stream:
                pass
        except Exception as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.finished = time.monotonic()
        with lock:
            outcomes.append(outcome)


def failover_drill(
    router_url: str, kill: Callable[[], None], *, clients: int = 4, before_s: float = 4.0, after_s: float = 8.0
) -> Drill:
    """`clients` concurrent streaming clients through the router; `kill` one pod after `before_s`; the load goes on
    for `after_s` more. Bounded: every loop stops when the drill does."""
    client = OpenAI(base_url=f"{router_url}/v1", api_key="unused", max_retries=0, timeout=60)
    stop, lock, outcomes = threading.Event(), threading.Lock(), []
    threads = [threading.Thread(target=_client_loop, args=(client, stop, outcomes, lock)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(before_s)
    killed_at = time.monotonic()
    kill()
    time.sleep(after_s)
    stop.set()
    for thread in threads:
        thread.join(90)
    return Drill(killed_at, outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="the router's port; pod i listens on port + i")
    parser.add_argument("--pods", type=int, default=2)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/refine-fleet"))
    parser.add_argument("--drill", action="store_true", help="kill the last pod under load, report, and exit")
    args = parser.parse_args()
    # SIGTERM and Ctrl-C end the script through the `finally` that stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pods: list[Process] = []
    router = None
    try:
        pods += [
            start_pod(f"pod{i}", args.port + i, args.port + 100 + i, args.log_dir) for i in range(1, args.pods + 1)
        ]
        for pod in pods:
            wait_ready(pod)
        router = start_router("router", args.port, args.port + 90, [pod.url for pod in pods], args.log_dir)
        wait_ready(router, "/health", 60)
        print(f"router on {router.url}/v1 in front of {', '.join(pod.url for pod in pods)} (logs: {args.log_dir})")
        if args.drill:
            print(failover_drill(router.url, pods[-1].kill).summary())
        else:
            threading.Event().wait()
    finally:
        for server in ([router] if router else []) + pods:
            server.stop()


if __name__ == "__main__":
    main()
