"""CyberV's prefix-cache hits in the two ways to put refine in front of many engines, measured on loopback.

- per pod: client -> vllm-router -> refine in each pod -> that pod's vLLM (every call of a request on one engine);
- refine tier: client -> one refine (external mode) -> vllm-router -> the engines, each engine call routed on its
  own: round_robin (no affinity), cache_aware (the router's prefix matching on the prompt text), consistent_hash
  (affinity by a session key; refine's engine calls carry no session header).

Every shape answers the same seeded CyberV requests, each after the engines' prefix caches were emptied (vLLM's
/reset_prefix_cache, served in its dev mode), and the engines' own counters (vllm:prefix_cache_hits_total and
_queries_total, in prompt tokens, summed over the engines) are read before and after.

    .venv/bin/python scripts/fleet_cache.py --port 48200     # two pods, four routers, three tiers; the table
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refine_server.models.catalog import DEFAULT_MODEL
from scripts.fleet import Process, scrape, start_pod, start_router, start_tier, wait_ready

# Four candidates in two batches, then feedback when round 1 is unsure. The sensor every shape can use: the tier's
# refine holds no engine secret, so the in-engine sensor is not an option there.
CYBERV = {
    "policy": "cyberv",
    "n": 4,
    "batch_size": 2,
    "max_reasoning_tokens": 32,
    "max_feedback_tokens": 16,
    "sensor": "top_logprobs",
}


def cache_counters(engine_urls: list[str]) -> list[tuple[float, float]]:
    """(hit tokens, queried tokens) of each engine."""

    def total(url: str, name: str) -> float:
        return sum(scrape(f"{url}/metrics", name).values())

    return [
        (total(url, "vllm:prefix_cache_hits_total"), total(url, "vllm:prefix_cache_queries_total"))
        for url in engine_urls
    ]


def measure(url: str, engine_urls: list[str], questions: list[str]) -> tuple[list[tuple[float, float]], int]:
    """Each engine's (hit tokens, queried tokens) over `questions`, one CyberV request each, from empty caches; and
    the engine calls the requests made."""
    for engine in engine_urls:
        httpx.post(f"{engine}/reset_prefix_cache", timeout=30).raise_for_status()
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    before = cache_counters(engine_urls)
    calls = 0
    for question in questions:
        resp = client.chat.completions.create(
            model=DEFAULT_MODEL.name,
            messages=[{"role": "user", "content": question}],
            max_tokens=16,
            seed=0,
            extra_body={"refine": CYBERV},
        )
        calls += sum(r["engine_calls"] for r in resp.model_extra["refine"]["trace"]["rounds"].values())
    after = cache_counters(engine_urls)
    return [(h1 - h0, q1 - q0) for (h0, q0), (h1, q1) in zip(before, after, strict=True)], calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="the per-pod router; pods on port + 1, 2")
    parser.add_argument("--questions", type=int, default=8, help="CyberV requests per shape")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/refine-fleet-cache"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started, below
    started: list[Process] = []
    try:
        pods = [
            start_pod(f"pod{i}", args.port + i, args.port + 100 + i, args.log_dir, {"VLLM_SERVER_DEV_MODE": "1"})
            for i in (1, 2)
        ]
        started += pods
        for pod in pods:
            wait_ready(pod)
        engines = [f"http://127.0.0.1:{args.port + 100 + i}" for i in (1, 2)]
        router = start_router("router", args.port, args.port + 90, [pod.url for pod in pods], args.log_dir)
        started.append(router)
        wait_ready(router, "/health", 60)
        shapes = {"per pod (router round_robin in front of the pods)": router.url}
        for offset, policy in ((10, "round_robin"), (20, "cache_aware"), (30, "consistent_hash")):
            tier_router = start_router(
                f"tier-router-{policy}",
                args.port + offset,
                args.port + offset + 1,
                engines,
                args.log_dir,
                "--policy",
                policy,
                "--health-check-endpoint",
                "/health",
            )
            started.append(tier_router)
            wait_ready(tier_router, "/health", 60)
            tier = start_tier(f"refine-tier-{policy}", args.port + offset + 2, tier_router.url, args.log_dir)
            started.append(tier)
            wait_ready(tier, "/readyz", 120)
            shapes[f"refine tier (router {policy} in front of the engines)"] = tier.url
        questions = [f"What is {a} + {2 * a + 7}? Answer with the number." for a in range(11, 11 + args.questions)]
        print(
            "| shape | CyberV requests | engine calls | prompt tokens from the prefix cache | share of the prompt "
            "tokens per engine |"
        )
        print("|---|---|---|---|---|")
        for shape, url in shapes.items():
            per_engine, calls = measure(url, engines, questions)
            hits, queries = sum(h for h, _ in per_engine), sum(q for _, q in per_engine)
            shares = " / ".join(f"{q / queries:.0%}" for _, q in per_engine)
            print(
                f"| {shape} | {len(questions)} | {calls} | {hits:.0f} of {queries:.0f} ({hits / queries:.1%}) "
                f"| {shares} |",
                flush=True,
            )
    finally:
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    main()
