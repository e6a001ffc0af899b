"""The engine's secret for the engine plugin's unit tests, and SRGen and token-statistics requests signed as
refine's proxy signs them."""

from __future__ import annotations

import json

from vllm import SamplingParams

from refine_server.contract.protocol import signed_xargs

SECRET = "s" * 64


def _srgen(temperature: float = 0.6, secret: str = SECRET, **params) -> SamplingParams:
    return SamplingParams(temperature=temperature, extra_args=signed_xargs(secret, "srgen", json.dumps(params)))


def _stats(temperature: float = 0.0, secret: str = SECRET, **params) -> SamplingParams:
    """A token-statistics request; `params`: its TokenStatsParams (confidence_k, stop)."""
    return SamplingParams(temperature=temperature, extra_args=signed_xargs(secret, "token_stats", json.dumps(params)))
