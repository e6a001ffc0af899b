"""refine's own cost as a relay: the same streams from a fast stand-in upstream, directly and through refine.

Starts `bench/standin_upstream.py` (a vLLM imitation that costs next to nothing per token) and refine in
external mode in front of it, both as subprocesses on free loopback ports, then:

    .venv/bin/python bench/proxy.py [--streams 1,16,64,256] [--rounds 3] [--requests N] [--workers N]
                                    [--apis chat,responses,messages --api-streams 16]

For each concurrency level, rounds alternate direct (the stand-in) / refine so both see the same machine
state; each round sends `--requests` streaming completions (default max(4 * concurrency, 32)) of `--tokens`
tokens, one every `--interval-ms`. Reported per level, medians over rounds: delivered tokens/s (chunks with
non-empty text) direct and via refine and their ratio; the TTFT refine adds (p50 and p99, refine minus
direct); and refine's CPU seconds per relayed token (utime + stime of refine's whole process tree, from psutil,
before and after each refine round). Then the TTFT refine adds at one stream, measured in pairs: a request
to the stand-in and one through refine back to back, in alternating order, `--ttft-pairs` times (4-token
answers: the first token is what counts); reported as the median of the pairs' differences with its 95%
interval, which a sub-millisecond difference needs (the per-level figure above subtracts medians of separate
rounds and moves by +-0.3 ms from run to run). With `--apis`, refine's CPU per token through each of the named
streaming APIs, their rounds interleaved. Then non-streaming chat completions at concurrency 16: refine's
CPU per request and the latency it adds. Results go to bench/results/proxy.json, with the git commit measured and
whether the tree had uncommitted changes.

The bench client, the stand-in and refine share the machine's cores, so on a small machine the absolute
throughputs are those of a CPU-bound trio; the CPU per token is the figure to compare across refine versions.
The client stays light for that reason: it spots token chunks with string tests, never parsing their JSON.
CPU times come in 10 ms ticks: keep rounds well above a second (the default request counts do) when quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from stats import median_interval

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
MODEL = "standin"


# ---- processes --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A subprocess whose output goes to a temporary log, shown only when it fails to start."""

    name: str
    cmd: list[str]
    proc: subprocess.Popen[bytes] = field(init=False)
    log: Any = field(init=False)

    def start(self, ready_url: str, timeout_s: float = 120.0) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the process's log, closed by stop()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(ready_url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.log.seek(0)
        tail = self.log.read()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{self.name} did not become ready at {ready_url}:\n{shlex.join(self.cmd)}\n{tail}")

    def cpu_s(self) -> float:
        """utime + stime of the process and every descendant, reaped ones included (via children_*)."""
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return total
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue  # exited between listing and reading; its time is lost, not double-counted
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def stop(self) -> None:
        """Only this server's own process tree: SIGTERM, then SIGKILL for whatever is still there."""
        if not hasattr(self, "proc"):
            return
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in tree[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.log.close()


# ---- client -----------------------------------------------------------------------------------------------

# Connections the bench client found reset before any byte came back, by URL: retried once, and reported.
# (At 256 streams a pooled connection is now and then reset by the server side, direct or through refine alike.)
RESETS: dict[str, int] = {}


@dataclass(frozen=True)
class StreamedAPI:
    """One streaming API as the bench client sends and reads it: its path, its body, and how a token's line
    looks (a `data: {` line with `marker`, not `empty`: both servers write compact JSON)."""

    path: str
    body: dict[str, Any]
    marker: str
    empty: str = "\x00"  # never in a line unless set


PROMPT = "Write a short story about a lighthouse keeper."
APIS = {
    "completions": StreamedAPI("/v1/completions", {"prompt": PROMPT}, '"text":"', '"text":""'),
    "chat": StreamedAPI(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}, '"content":"', '"content":""'
    ),
    "responses": StreamedAPI("/v1/responses", {"input": PROMPT}, '"type":"response.output_text.delta"'),
    "messages": StreamedAPI(
        "/v1/messages", {"messages": [{"role": "user", "content": PROMPT}]}, '"type":"content_block_delta"'
    ),
}


def api_stream_body(api: str, tokens: int) -> dict[str, Any]:
    length = {"responses": "max_output_tokens"}.get(api, "max_tokens")
    extra = {"stream_options": {"include_usage": True}} if api in ("completions", "chat") else {}
    return {"model": MODEL, **APIS[api].body, length: tokens, "stream": True, **extra}


async def stream_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], api: str = "completions"
) -> tuple[float, int]:
    """(time to the first token, tokens). A token is a `data: {` line whose text is not empty."""
    try:
        return await _stream_once(client, url, body, APIS[api])
    except (httpx.ReadError, httpx.RemoteProtocolError):
        RESETS[url] = RESETS.get(url, 0) + 1
        return await _stream_once(client, url, body, APIS[api])


async def _stream_once(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], api: StreamedAPI
) -> tuple[float, int]:
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async with client.stream("POST", url + api.path, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code} {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and api.marker in line and api.empty not in line:
                if not tokens:
                    ttft = time.perf_counter() - started
                tokens += 1
            elif line.startswith(('data: {"error"', 'data: {"type":"error"')):
                raise RuntimeError(f"{url}: error in stream: {line[:300]}")
    return ttft, tokens


async def plain_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[float, int]:
    started = time.perf_counter()
    resp = await client.post(f"{url}/v1/chat/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {resp.status_code} {resp.text[:300]}")
    return time.perf_counter() - started, 1


async def run_round(
    client: httpx.AsyncClient, url: str, one: Any, body: dict[str, Any], concurrency: int, requests: int, server: Server
) -> dict[str, Any]:
    """`requests` calls of `one`, `concurrency` at a time; the CPU `server` spent meanwhile."""
    pending = iter(range(requests))
    results: list[tuple[float, int]] = []

    async def worker() -> None:
        for _ in pending:  # the workers share one iterator: each request is sent once
            results.append(await one(client, url, body))

    cpu_before = server.cpu_s()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    wall = time.perf_counter() - started
    cpu = server.cpu_s() - cpu_before
    firsts = sorted(r[0] for r in results)  # TTFT of a stream; the whole latency of a plain call
    count = sum(r[1] for r in results)
    if not count:
        raise RuntimeError(f"{url}: {requests} requests delivered no tokens")
    return {
        "wall_s": wall,
        "count": count,
        "rate": count / wall,
        "cpu_s": cpu,
        "cpu_per_item_s": cpu / count,
        "p50_s": percentile(firsts, 50),
        "p99_s": percentile(firsts, 99),
    }


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


async def paired_ttft(
    client: httpx.AsyncClient, direct: str, refine: str, body: dict[str, Any], pairs: int
) -> dict[str, Any]:
    """The TTFT refine adds at one stream: each pair is one request direct and one through refine, back to
    back, the order alternating, so both see the same moment of a noisy machine."""
    differences = []
    for i in range(pairs):
        order = (direct, refine) if i % 2 == 0 else (refine, direct)
        ttft = {url: (await stream_one(client, url, body))[0] for url in order}
        differences.append(ttft[refine] - ttft[direct])
    differences.sort()
    low, high = median_interval(differences)
    return {
        "pairs": pairs,
        "added_ttft_p50_ms": statistics.median(differences) * 1e3,
        "interval_95_ms": [low * 1e3, high * 1e3],
    }


# ---- bench ------------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, direct: str, refine: str, standin: Server, proxy: Server) -> dict:
    stream_body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": args.tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chat_body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
        "max_tokens": args.tokens,
    }
    top = max([*args.streams, args.chat_concurrency])
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them under the client's feet.
    limits = httpx.Limits(max_connections=top + 8, max_keepalive_connections=top + 8, keepalive_expiry=2.0)
    report: dict[str, Any] = {"streams": [], "apis": [], "ttft_one_stream": None, "chat": None}
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for url, server in ((direct, standin), (refine, proxy)):  # warm-up: connections, imports, caches
            await run_round(client, url, stream_one, stream_body, 4, 8, server)
            await run_round(client, url, plain_one, chat_body, 4, 8, server)

        for c in args.streams:
            requests = args.requests or max(4 * c, 32)
            d_rounds, r_rounds = [], []
            for _ in range(args.rounds):
                d_rounds.append(await run_round(client, direct, stream_one, stream_body, c, requests, standin))
                r_rounds.append(await run_round(client, refine, stream_one, stream_body, c, requests, proxy))
            d_rate, r_rate = median(d_rounds, "rate"), median(r_rounds, "rate")
            level = {
                "concurrency": c,
                "requests_per_round": requests,
                "direct_tok_s": d_rate,
                "refine_tok_s": r_rate,
                "ratio": r_rate / d_rate,
                "added_ttft_p50_ms": (median(r_rounds, "p50_s") - median(d_rounds, "p50_s")) * 1e3,
                "added_ttft_p99_ms": (median(r_rounds, "p99_s") - median(d_rounds, "p99_s")) * 1e3,
                "refine_cpu_us_per_token": median(r_rounds, "cpu_per_item_s") * 1e6,
                # The stand-in's own cost per token when called directly: the floor a Python relay sits on.
                "standin_cpu_us_per_token": median(d_rounds, "cpu_per_item_s") * 1e6,
                "rounds": {"direct": d_rounds, "refine": r_rounds},
            }
            report["streams"].append(level)
            print(
                f"c={c:<4d} direct {d_rate:8.0f} tok/s  refine {r_rate:8.0f} tok/s  ratio {level['ratio']:.3f}  "
                f"+ttft p50 {level['added_ttft_p50_ms']:6.1f} ms p99 {level['added_ttft_p99_ms']:6.1f} ms  "
                f"refine cpu {level['refine_cpu_us_per_token']:6.1f} us/tok  "
                f"(stand-in {level['standin_cpu_us_per_token']:.1f})",
                flush=True,
            )

        if args.apis:
            report["apis"] = await compare_apis(client, args, direct, refine, standin, proxy)

        if args.ttft_pairs:
            report["ttft_one_stream"] = paired = await paired_ttft(
                client, direct, refine, {**stream_body, "max_tokens": 4}, args.ttft_pairs
            )
            low, high = paired["interval_95_ms"]
            print(
                f"added ttft at 1 stream, {args.ttft_pairs} pairs: median {paired['added_ttft_p50_ms']:.2f} ms "
                f"(95% interval {low:.2f} to {high:.2f})",
                flush=True,
            )

        c = args.chat_concurrency
        requests = args.requests or max(4 * c, 32)
        d_rounds, r_rounds = [], []
        for _ in range(args.rounds):
            d_rounds.append(await run_round(client, direct, plain_one, chat_body, c, requests, standin))
            r_rounds.append(await run_round(client, refine, plain_one, chat_body, c, requests, proxy))
        chat = {
            "concurrency": c,
            "requests_per_round": requests,
            "direct_req_s": median(d_rounds, "rate"),
            "refine_req_s": median(r_rounds, "rate"),
            "added_latency_p50_ms": (median(r_rounds, "p50_s") - median(d_rounds, "p50_s")) * 1e3,
            "refine_cpu_ms_per_request": median(r_rounds, "cpu_per_item_s") * 1e3,
            "rounds": {"direct": d_rounds, "refine": r_rounds},
        }
        report["chat"] = chat
        print(
            f"chat (not streamed) c={c}: direct {chat['direct_req_s']:.1f} req/s  refine {chat['refine_req_s']:.1f} "
            f"req/s  +latency p50 {chat['added_latency_p50_ms']:.1f} ms  "
            f"refine cpu {chat['refine_cpu_ms_per_request']:.2f} ms/request",
            flush=True,
        )
    return report


async def compare_apis(
    client: httpx.AsyncClient, args: argparse.Namespace, direct: str, refine: str, standin: Server, proxy: Server
) -> list[dict[str, Any]]:
    """refine's CPU per relayed token through each API (`--apis`) at `--api-streams` concurrent streams: the
    APIs' rounds interleaved, each a direct round then a refine round, so all see the same machine."""
    apis = args.apis.split(",")
    c = args.api_streams
    requests = args.requests or max(4 * c, 32)
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {api: {"direct": [], "refine": []} for api in apis}
    for api in apis:  # warm-up
        await run_round(
            client,
            refine,
            lambda cl, u, b, a=api: stream_one(cl, u, b, a),
            api_stream_body(api, args.tokens),
            4,
            8,
            proxy,
        )
    for _ in range(args.rounds):
        for api in apis:
            body, one = api_stream_body(api, args.tokens), (lambda cl, u, b, a=api: stream_one(cl, u, b, a))
            rounds[api]["direct"].append(await run_round(client, direct, one, body, c, requests, standin))
            rounds[api]["refine"].append(await run_round(client, refine, one, body, c, requests, proxy))
    results = []
    for api in apis:
        d, r = rounds[api]["direct"], rounds[api]["refine"]
        results.append(
            {
                "api": api,
                "concurrency": c,
                "direct_tok_s": median(d, "rate"),
                "refine_tok_s": median(r, "rate"),
                "ratio": median(r, "rate") / median(d, "rate"),
                "refine_cpu_us_per_token": median(r, "cpu_per_item_s") * 1e6,
                "refine_cpu_us_per_token_rounds": [x["cpu_per_item_s"] * 1e6 for x in r],
                "standin_cpu_us_per_token": median(d, "cpu_per_item_s") * 1e6,
                "rounds": rounds[api],
            }
        )
        print(
            f"{api:<12s} c={c}: refine cpu {results[-1]['refine_cpu_us_per_token']:6.1f} us/tok  "
            f"ratio {results[-1]['ratio']:.3f}",
            flush=True,
        )
    return results


def revision() -> dict[str, Any]:
    """The refine code measured: a figure from an uncommitted tree cannot be traced back to a commit."""

    def git(*argv: str) -> str:
        # --no-optional-locks: reading the state must not rewrite the index under the other work in this tree.
        cmd = ["git", "--no-optional-locks", *argv]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # Results of earlier runs (bench/results) do not make the code measured differ from the commit.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,16,64,256", help="concurrency levels, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per side and level (medians reported)")
    ap.add_argument("--requests", type=int, default=0, help="requests per round (0: max(4 * concurrency, 32))")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    ap.add_argument("--interval-ms", type=float, default=5.0, help="the stand-in's time between two tokens")
    ap.add_argument("--ttft-pairs", type=int, default=400, help="paired requests for the added TTFT at 1 stream")
    ap.add_argument("--chat-concurrency", type=int, default=16, help="concurrency of the non-streaming part")
    ap.add_argument("--workers", type=int, default=None, help="passed to refine as --workers N when given")
    ap.add_argument(
        "--apis",
        default="",
        help="also compare refine's CPU per token across these streaming APIs, "
        "comma-separated (completions, chat, responses, messages), rounds interleaved",
    )
    ap.add_argument("--api-streams", type=int, default=16, help="concurrent streams of the --apis comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "proxy.json")
    args = ap.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]

    direct_port, refine_port = free_port(), free_port()
    direct, refine = f"http://127.0.0.1:{direct_port}", f"http://127.0.0.1:{refine_port}"
    standin = Server(
        "stand-in",
        [
            str(PYTHON),
            str(ROOT / "bench" / "standin_upstream.py"),
            "--port",
            str(direct_port),
            "--model",
            MODEL,
            "--tokens",
            str(args.tokens),
            "--interval-ms",
            str(args.interval_ms),
        ],
    )
    proxy_cmd = [str(PYTHON), "-m", "refine_server", "--backend-url", direct, "--port", str(refine_port)]
    if args.workers is not None:  # refine may not know the flag: pass it only when asked
        proxy_cmd += ["--workers", str(args.workers)]
    proxy = Server("refine", proxy_cmd)
    try:
        standin.start(f"{direct}/health")
        proxy.start(f"{refine}/ready")
        report = asyncio.run(bench(args, direct, refine, standin, proxy))
    finally:
        proxy.stop()
        standin.stop()

    report = {
        "command": shlex.join([".venv/bin/python", "bench/proxy.py", *sys.argv[1:]]),
        "refine_command": shlex.join(proxy_cmd),
        "revision": revision(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "tokens": args.tokens,
        "interval_ms": args.interval_ms,
        "rounds": args.rounds,
        "connection_resets_retried": {"direct" if url == direct else "refine": n for url, n in RESETS.items()},
        **report,
    }
    if RESETS:
        print(f"connections reset before an answer and retried: {report['connection_resets_retried']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
