"""refine's plugin inside vLLM: a batch-level v1 logits processor that in-engine policies arrive through.

vLLM loads it from this package's `vllm.logits_processors` entry point, in the embedded server and in any
external vLLM where refine is pip-installed. It is off for every request that does not name an in-engine
policy in `vllm_xargs["refine_policy"]`, so plain traffic pays one dict lookup per new request.

It also answers refine's handshake: a request naming a policy the plugin does not know is rejected at
admission with a 400 whose message starts with `PLUGIN_MARKER` and the plugin's version. A vLLM without
the plugin ignores the unknown argument instead, which is how the proxy tells the two apart.
"""

from __future__ import annotations

from importlib import metadata

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from refine_server.engine_protocol import PLUGIN_MARKER, POLICY_ARG

# In-engine policies this plugin implements. Empty until the first one lands; the handshake works already.
IN_ENGINE_POLICIES: frozenset[str] = frozenset()


def plugin_version() -> str:
    try:
        return metadata.version("refine-server")
    except metadata.PackageNotFoundError:
        return "unknown"


class RefineLogitsProcessor(LogitsProcessor):
    """Dispatches the rows of requests that asked for an in-engine policy; leaves every other row alone."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        policy = (sampling_params.extra_args or {}).get(POLICY_ARG)
        if policy is not None and policy not in IN_ENGINE_POLICIES:
            raise ValueError(
                f"{PLUGIN_MARKER} {plugin_version()}: unknown in-engine policy {policy!r} "
                f"(known: {sorted(IN_ENGINE_POLICIES)})"
            )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
