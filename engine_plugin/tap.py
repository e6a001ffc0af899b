"""The hidden-state tap: what the model computed this step, for the logits processors of the same step.

vLLM exposes hidden states to no plugin interface, so `attach` (called by the general plugin when vLLM loads a
model) puts two forward hooks on the model:
- on the `*ForCausalLM` module: the final hidden states (after the final norm: lm_head's input) of every
  token scheduled this step, with their positions and the attention metadata's `query_start_loc` (tokens of
  batch row i are qsl[i]:qsl[i+1]). This is where prompt positions come from. It does not fire when vLLM
  replays a full CUDA graph, which it does for decode-only steps on a GPU;
- on the model's logits layer: the hidden state of each row that becomes a row of the logits the
  processors receive, in the same order. This runs outside CUDA graphs, so it fires at every step.

Both hooks only keep references, and only while a request uses SRGen (`active`): no copy and no device sync
for anyone else. The tensors stay valid until the step's logits processors have run.

`attach` also works out, once, why this engine cannot run SRGen correctly (`unsupported`), and writes it where
the API server's admission check reads it (`write_facts` / `read_facts`), so such requests get a 400.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FACTS_FILE = "engine-facts.json"


@dataclass
class ForwardCapture:
    hidden: torch.Tensor  # [tokens, d]
    positions: torch.Tensor  # [tokens]
    query_start_loc: torch.Tensor | None  # [rows + 1], None when the attention backend has none

    @cached_property
    def host_rows(self) -> list[tuple[int, int, int]]:
        """(first token, end token, first position) of each batch row, read to the host once per step."""
        assert self.query_start_loc is not None
        qsl = self.query_start_loc.tolist()
        firsts = self.positions[self.query_start_loc[:-1].clamp(max=self.positions.shape[0] - 1)].tolist()
        return list(zip(qsl[:-1], qsl[1:], firsts))


class HiddenStateTap:
    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.active = False  # set by the logits processors: some live request uses SRGen
        self.forward: ForwardCapture | None = None
        self.sampled: torch.Tensor | None = None  # [logits rows, d]
        self.unsupported: list[str] = []

    def attach(self, model: torch.nn.Module, vllm_config: Any) -> None:
        if self.model is model:
            return
        self.model = model
        self.unsupported = unsupported_reasons(model, vllm_config)
        layer = getattr(model, "logits_processor", None)
        model.register_forward_hook(self._capture_forward, with_kwargs=True)
        if isinstance(layer, torch.nn.Module):
            layer.register_forward_hook(self._capture_sampled)

    def begin_step(self) -> None:
        """Forget the last step's tensors, so a step whose hooks did not fire is never read stale."""
        self.forward = None
        self.sampled = None

    def lm_head_weight(self, vocab_size: int) -> torch.Tensor:
        """lm_head's [V, d] weight as the engine holds it (no copy), without vocabulary padding rows."""
        assert self.model is not None, "no model attached: was refine's general plugin loaded?"
        return self.model.lm_head.weight[:vocab_size]

    def _capture_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.active:
            return
        from vllm.forward_context import get_forward_context, is_forward_context_available

        hidden = output[0] if isinstance(output, tuple) else output
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        qsl = None
        if is_forward_context_available():
            metadata_by_layer = get_forward_context().attn_metadata
            if isinstance(metadata_by_layer, dict) and metadata_by_layer:
                first = next(iter(metadata_by_layer.values()))
                # A device-side copy: the runner reuses this buffer for the next step.
                qsl = first.query_start_loc.clone() if hasattr(first, "query_start_loc") else None
        if isinstance(hidden, torch.Tensor) and isinstance(positions, torch.Tensor):
            self.forward = ForwardCapture(hidden, positions, qsl)

    def _capture_sampled(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.active and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.sampled = args[1]


def unsupported_reasons(model: torch.nn.Module, vllm_config: Any) -> list[str]:
    """Why SRGen's loss, which assumes logits = h @ lm_head.T over the whole vocabulary, would be wrong here."""
    reasons = []
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        reasons.append("tensor or pipeline parallelism: each rank holds a shard of lm_head")
    if getattr(parallel, "enable_batch_sharded_sampling", False):
        reasons.append("batch-sharded sampling: each rank samples only some requests")
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding: vLLM does not run plugin logits processors with it")
    lm_head = getattr(model, "lm_head", None)
    layer = getattr(model, "logits_processor", None)
    if lm_head is None or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        reasons.append("the model has no lm_head weight")
    else:
        if not lm_head.weight.is_floating_point() or type(getattr(lm_head, "quant_method", None)).__name__ not in (
            "NoneType",
            "UnquantizedEmbeddingMethod",
        ):
            reasons.append("a quantised lm_head")
        if getattr(lm_head, "bias", None) is not None:
            reasons.append("an lm_head with a bias")
    if layer is None:
        reasons.append("the model has no logits layer to read hidden states from")
    elif getattr(layer, "soft_cap", None) is not None or getattr(layer, "scale", 1.0) != 1.0:
        reasons.append("the model scales or soft-caps its logits")
    return reasons


def write_facts(folder: Path, facts: dict[str, Any]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FACTS_FILE).write_text(json.dumps(facts))
    except OSError:
        log.exception("refine: could not write the engine facts for admission")


def read_facts(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / FACTS_FILE).read_text())
    except (OSError, ValueError):
        return None


HIDDEN_STATES = HiddenStateTap()
"""The one process-wide object: vLLM builds the model and the sampler's processors separately and gives
neither a handle on the other, so the tap is where they meet."""
