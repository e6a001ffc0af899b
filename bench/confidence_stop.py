"""What DeepConf's in-engine confidence stop costs: decode time per token at a given concurrency with nothing,
with the token-statistics sensor alone, and with the sensor and the stop, in one run on one engine.

Start refine with a known engine secret (the bench signs its requests as the proxy does), then:

    REFINE_ENGINE_SECRET=bench-secret .venv/bin/refine --port 8000 --engine-port 8100 &
    REFINE_ENGINE_SECRET=bench-secret .venv/bin/python bench/confidence_stop.py --engine http://127.0.0.1:8100

Every request decodes exactly `max_tokens` tokens (min_tokens = max_tokens: EOS stays masked, so the stop
computes its window mean at every step and never fires: the cost of the check, not of a shorter trace). Rounds
interleave the three settings so each sees the same machine state; per request, decode time per token is
(last token's arrival - first token's) / (tokens - 1); a round's figure is the median over its requests, the
report the median over rounds and the ratios to "nothing".

`--micro [--vocab V]`: the plugin's own work per engine step, without an engine: 8 stop rows of random logits at
SmolLM2's vocabulary (or V's) through the sensor's `observe` (which measures the confidence for every row that asks
for statistics, stop or not) and then the stop's `apply` (what the stop adds), each timed per step in this
process, one thread. Results go to `confidence_stop_micro-V.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
from streams import timed_stream

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refine_server.contract.params import ConfidenceStopParams, TokenStatsParams
from refine_server.contract.protocol import REQUEST_KEY_ARG, SECRET_ENV, TOKEN_STATS, events_dir, signed_xargs
from refine_server.contract.token_stats_file import discard_stats

SETTINGS = ("nothing", "sensor", "sensor+stop")


def xargs_for(setting: str, secret: str, window: int) -> dict[str, str] | None:
    if setting == "nothing":
        return None
    # A threshold below every confidence (C >= 0): the stop runs its check every step and never fires.
    stop = ConfidenceStopParams(threshold=-1.0, window=window) if setting == "sensor+stop" else None
    return signed_xargs(secret, TOKEN_STATS, TokenStatsParams(stop=stop).model_dump_json(exclude_none=True))


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> float:
    """Seconds per decoded token of one streamed completion."""
    timed = await timed_stream(client, f"{url}/v1/completions", body)
    tokens = (timed.usage or {}).get("completion_tokens")
    if tokens != body["max_tokens"]:
        raise RuntimeError(f"decoded {tokens} tokens, not {body['max_tokens']}")
    return (timed.arrivals[-1] - timed.arrivals[0]) / (tokens - 1)


async def one_round(
    client: httpx.AsyncClient, args: argparse.Namespace, setting: str, secret: str, round_no: int
) -> float:
    bodies = []
    for i in range(args.concurrency):
        body = {
            "model": args.model,
            "prompt": f"Write a short story about a lighthouse keeper, number {i}.",
            "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens,
            "temperature": 0.8,
            "seed": round_no * 1000 + i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        xargs = xargs_for(setting, secret, args.window)
        if xargs:
            body["vllm_xargs"] = xargs
        bodies.append(body)
    try:
        per_token = await asyncio.gather(*(one_request(client, args.engine, b) for b in bodies))
    finally:
        for body in bodies:
            if "vllm_xargs" in body:
                discard_stats(args.events_dir, body["vllm_xargs"][REQUEST_KEY_ARG])
    return statistics.median(per_token)


def micro(args: argparse.Namespace) -> None:
    import tempfile

    import torch
    from vllm import SamplingParams

    from refine_server.engine_plugin.sensor import StatsRow, TokenStatsSensor

    vocab, steps = args.vocab, 200
    torch.set_num_threads(1)  # one core, as one engine step's sampler runs
    folder = Path(tempfile.mkdtemp())
    sensor = TokenStatsSensor(folder, vocab_size=vocab, capacity=64)
    xargs = xargs_for("sensor+stop", "s", args.window)
    seqs = [sensor.admit(SamplingParams(temperature=0.8, stop_token_ids=[2], extra_args=xargs)) for _ in range(8)]
    logits = torch.randn(8, vocab)
    measure_s, stop_s = [], []
    for t in range(steps):
        work = logits.clone()
        started = time.perf_counter()
        measured = sensor.observe(work, [StatsRow(i, seq, t) for i, seq in enumerate(seqs)])
        between = time.perf_counter()
        sensor.stop.apply(work, measured)  # what the stop adds to the sensor's step
        stop_s.append(time.perf_counter() - between)
        sensor.sampled(torch.ones(8, 1, dtype=torch.long))
        measure_s.append(between - started)
    sensor.flush()
    figures = {
        "sensor_observe": round(statistics.median(measure_s[20:]) * 1000, 3),
        "stop_apply": round(statistics.median(stop_s[20:]) * 1000, 3),
    }
    result = {
        "command": " ".join(sys.argv),
        "rows": 8,
        "vocab": vocab,
        "window": args.window,
        "ms_per_step_median": figures,
    }
    out = args.out.with_name(f"confidence_stop_micro-{vocab}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="http://127.0.0.1:8100")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--events-dir", type=Path, default=events_dir(), help="the engine's (its stats files go)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "confidence_stop.json")
    ap.add_argument("--micro", action="store_true", help="the plugin's work per step, in-process, no engine")
    ap.add_argument("--vocab", type=int, default=49152, help="--micro: the vocabulary (Qwen2.5's: 151936)")
    args = ap.parse_args()
    if args.micro:
        return micro(args)
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        sys.exit(f"set {SECRET_ENV} to the engine's secret")

    rounds: dict[str, list[float]] = {s: [] for s in SETTINGS}
    async with httpx.AsyncClient(timeout=600) as client:
        await one_round(client, args, "nothing", secret, -1)  # warm-up, not counted
        for r in range(args.rounds):
            order = SETTINGS if r % 2 == 0 else tuple(reversed(SETTINGS))
            for setting in order:
                rounds[setting].append(await one_round(client, args, setting, secret, r))
                print(f"round {r} {setting}: {rounds[setting][-1] * 1000:.2f} ms/token", flush=True)
    medians = {s: statistics.median(v) for s, v in rounds.items()}
    result = {
        "command": " ".join(sys.argv),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "window": args.window,
        "rounds": args.rounds,
        "ms_per_token_rounds": {s: [round(v * 1000, 3) for v in vs] for s, vs in rounds.items()},
        "ms_per_token_median": {s: round(v * 1000, 3) for s, v in medians.items()},
        "sensor_over_nothing": round(medians["sensor"] / medians["nothing"], 4),
        "stop_over_sensor": round(medians["sensor+stop"] / medians["sensor"], 4),
        "stop_over_nothing": round(medians["sensor+stop"] / medians["nothing"], 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
