"""What vLLM loads from refine (the entry points in pyproject.toml), in every vLLM process of an environment
where refine is installed.

- `register` (`vllm.general_plugins`): attaches the hidden-state tap to every model vLLM loads, and records
  what the worker found out about the engine for the API server's admission check.
- `RefineLogitsProcessor` (`vllm.logits_processors`): SRGen, and the token-statistics sensor, for the rows
  that ask for them. vLLM has two model runners with two logits-processor interfaces, and both load every
  class of that entry-point group: V2 refuses a class that is not a V2 processor, V1 constructs it with V1's
  arguments. This class is a subclass of both, and builds the implementation for the runner that constructs
  it (V1 passes `(vllm_config, device, is_pin_memory)`, V2 `(vllm_config, req_states)`). So vLLM starts with refine
  installed whichever runner it picks.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

from refine_server.engine_plugin import admission


def register() -> None:
    """`vllm.general_plugins` entry point. vLLM may call it more than once per process: idempotent."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if getattr(BaseModelLoader.load_model, "_refine_tap", False):
        return
    original = BaseModelLoader.load_model

    def load_model_with_tap(self, vllm_config, model_config, prefix: str = ""):
        from refine_server.contract.protocol import events_dir
        from refine_server.engine_plugin.sensor import token_stats_unsupported
        from refine_server.engine_plugin.tap import HIDDEN_STATES, write_facts

        model = original(self, vllm_config, model_config, prefix=prefix)
        if hasattr(model, "lm_head"):
            HIDDEN_STATES.attach(model, vllm_config)
            write_facts(
                events_dir(),
                {
                    "version": admission.plugin_version(),
                    "unsupported": HIDDEN_STATES.unsupported,
                    "token_stats_unsupported": token_stats_unsupported(vllm_config),
                },
            )
        return model

    load_model_with_tap._refine_tap = True  # type: ignore[attr-defined]
    BaseModelLoader.load_model = load_model_with_tap


class RefineLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """The entry point's class: dispatches to the implementation of the runner that constructs it."""

    def __new__(cls, vllm_config, *args):
        if args and isinstance(args[0], LogitsProcRequestState):
            from refine_server.engine_plugin.v2_processor import RefineV2LogitsProcessor

            return RefineV2LogitsProcessor(vllm_config, *args)
        from refine_server.engine_plugin.v1_processor import RefineV1LogitsProcessor

        return RefineV1LogitsProcessor(vllm_config, *args)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        admission.validate(sampling_params)
