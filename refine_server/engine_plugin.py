"""refine's plugin inside vLLM: where the in-engine policies (SRGen) run.

Two entry points of this package load it into every vLLM process of an environment where refine is installed:
- `vllm.general_plugins` -> `register()`: makes every model vLLM loads report its final hidden states to
  `HIDDEN_STATES` (vLLM exposes them to nothing else);
- `vllm.logits_processors` -> `RefineLogitsProcessor`: a batch-level v1 logits processor that is off for
  every row whose request did not name an in-engine policy in `vllm_xargs["refine_policy"]`.

Both run in vLLM's worker process, model forward first, then the sampler's processors, in the same step.
`HIDDEN_STATES` is the one piece of process-wide state, because vLLM builds the model and the sampler's
processors separately and gives neither a handle on the other.

The handshake: a request naming a policy the plugin does not know is rejected at admission with a 400 whose
message starts with `PLUGIN_MARKER` and the plugin's version; a vLLM without the plugin ignores the argument.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from pydantic import ValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from refine_server.engine_protocol import (
    PARAMS_ARG,
    PLUGIN_MARKER,
    POLICY_ARG,
    REQUEST_KEY_ARG,
    append_event,
    is_request_key,
)
from refine_server.kernels.token_stats import token_stats
from refine_server.policies.srgen import EntropyMonitor, ReflectionInput, SRGenParams, reflect

log = logging.getLogger(__name__)

IN_ENGINE_POLICIES = frozenset({"srgen"})


def plugin_version() -> str:
    try:
        return metadata.version("refine-server")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- hidden states ---------------------------------------------------------------------------------------

class HiddenStateTap:
    """The last forward pass's final hidden states (after the final norm: lm_head's input) for every
    scheduled token, with their absolute positions and the batch's query_start_loc (row i of the logits is
    batch index i, whose tokens are hidden[qsl[i]:qsl[i+1]]), plus the model's lm_head weight."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.query_start_loc: list[int] | None = None
        self.model: torch.nn.Module | None = None
        self._lm_head_fp32: torch.Tensor | None = None

    def attach(self, model: torch.nn.Module) -> None:
        if self.model is model:
            return
        self.model = model
        self._lm_head_fp32 = None
        model.register_forward_hook(self._capture, with_kwargs=True)

    def unsupported_reason(self) -> str | None:
        """Why SRGen cannot run on this model, or None. Its loss assumes logits = h @ lm_head.T exactly."""
        if self.model is None:
            return "no model reported its hidden states (refine's general plugin was not loaded)"
        layer = getattr(self.model, "logits_processor", None)
        if layer is not None and (getattr(layer, "soft_cap", None) is not None or getattr(layer, "scale", 1.0) != 1.0):
            return "the model scales or soft-caps its logits, which SRGen's loss does not model"
        return None

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        hidden = output[0] if isinstance(output, tuple) else output
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        qsl = None
        if is_forward_context_available():
            metadata_by_layer = get_forward_context().attn_metadata
            if isinstance(metadata_by_layer, dict) and metadata_by_layer:
                first = next(iter(metadata_by_layer.values()))
                # A copy: the runner reuses this buffer for the next step.
                qsl = first.query_start_loc.tolist() if hasattr(first, "query_start_loc") else None
        self.hidden, self.positions, self.query_start_loc = hidden, positions, qsl

    def lm_head_weight(self) -> torch.Tensor:
        """lm_head as a float32 [V, d] matrix, copied once: the reflection optimises in float32."""
        if self._lm_head_fp32 is None:
            assert self.model is not None, "no model attached: was the general plugin loaded?"
            self._lm_head_fp32 = self.model.lm_head.weight.detach().float().clone()
        return self._lm_head_fp32


HIDDEN_STATES = HiddenStateTap()


def register() -> None:
    """`vllm.general_plugins` entry point. vLLM may call it more than once per process: idempotent."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if getattr(BaseModelLoader.load_model, "_refine_tap", False):
        return
    original = BaseModelLoader.load_model

    def load_model_with_tap(self, vllm_config, model_config, prefix: str = ""):
        model = original(self, vllm_config, model_config, prefix=prefix)
        if hasattr(model, "lm_head"):
            HIDDEN_STATES.attach(model)
        return model

    load_model_with_tap._refine_tap = True  # type: ignore[attr-defined]
    BaseModelLoader.load_model = load_model_with_tap


# ---- per-row state ---------------------------------------------------------------------------------------

@dataclass
class SRGenSequence:
    """One sequence running with SRGen: its parameters, monitor, and final hidden states by position."""

    key: str
    ordinal: int
    params: SRGenParams
    temperature: float
    prompt_ids: list[int]
    output_ids: list[int]  # vLLM's live list: grows as tokens are sampled
    monitor: EntropyMonitor
    hidden: torch.Tensor | None = None
    filled: int = 0  # positions [0, filled) hold hidden states
    unavailable: bool = False  # SRGen could not run for this sequence (reported once in its events)

    def store(self, hidden: torch.Tensor, positions: torch.Tensor, max_len: int) -> bool:
        """Keep hidden states by absolute position, so a recomputed (preempted) sequence overwrites, not appends.

        False when the positions leave a gap: tokens the engine took from its prefix cache never pass the model.
        """
        if int(positions[0]) > self.filled:
            return False
        last = int(positions[-1]) + 1
        if self.hidden is None or self.hidden.shape[0] < last:
            capacity = min(max_len, max(64, 2 * last))
            grown = torch.empty((capacity, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
            if self.hidden is not None:
                grown[: self.filled] = self.hidden[: self.filled]
            self.hidden = grown
        self.hidden[positions.long()] = hidden
        self.filled = max(self.filled, last)
        return True

    def context_length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class RefineLogitsProcessor(LogitsProcessor):
    """Runs SRGen on the rows that asked for it; leaves every other row alone."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = sampling_params.extra_args or {}
        policy = args.get(POLICY_ARG)
        if policy is None:
            return
        if policy not in IN_ENGINE_POLICIES:
            raise ValueError(f"{PLUGIN_MARKER} {plugin_version()}: unknown in-engine policy {policy!r} "
                             f"(known: {sorted(IN_ENGINE_POLICIES)})")
        if not is_request_key(args.get(REQUEST_KEY_ARG)):
            raise ValueError(f"{PLUGIN_MARKER}: {REQUEST_KEY_ARG} must be 32 lowercase hex digits")
        try:
            SRGenParams.model_validate_json(str(args.get(PARAMS_ARG, "{}")))
        except ValidationError as exc:
            raise ValueError(f"{PLUGIN_MARKER}: bad {PARAMS_ARG}: {exc.errors()[0]['msg']}") from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.max_len = vllm_config.model_config.max_model_len
        self.tokenizer_name = vllm_config.model_config.tokenizer
        self._tokenizer = None
        self.rows: dict[int, SRGenSequence] = {}
        self._ordinals: dict[str, int] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # a correction changes which token wins

    # ---- batch bookkeeping ---------------------------------------------------------------------------

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self.rows.pop(index, None)
            args = params.extra_args or {}
            if args.get(POLICY_ARG) == "srgen":
                self.rows[index] = self._start_sequence(args, params, prompt_ids or [], output_ids)
        for src, dst, direction in batch_update.moved:
            moving = self.rows.pop(src, None)
            if direction == MoveDirectionality.SWAP:
                other = self.rows.pop(dst, None)
                if other is not None:
                    self.rows[src] = other
            else:
                self.rows.pop(dst, None)
            if moving is not None:
                self.rows[dst] = moving

    def _start_sequence(self, args: dict, params, prompt_ids: list[int], output_ids: list[int]) -> SRGenSequence:
        key = args[REQUEST_KEY_ARG]
        ordinal = self._ordinals.get(key, 0)
        self._ordinals[key] = ordinal + 1
        if len(self._ordinals) > 4096:  # forget the oldest keys; only n>1 requests share one
            self._ordinals.pop(next(iter(self._ordinals)))
        srgen = SRGenParams.model_validate_json(args.get(PARAMS_ARG, "{}"))
        append_event(key, {"event": "admitted", "sequence": ordinal})
        # Greedy requests have no temperature to measure entropy at: use the model's own distribution.
        temperature = params.temperature if params.temperature and params.temperature > 1e-5 else 1.0
        return SRGenSequence(key, ordinal, srgen, temperature, list(prompt_ids), output_ids, EntropyMonitor(srgen))

    # ---- the step --------------------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        tap = HIDDEN_STATES
        reason = tap.unsupported_reason()
        if reason is None and (tap.hidden is None or tap.query_start_loc is None):
            reason = "no hidden states were captured for this step"
        ready: list[int] = []
        for row, seq in self.rows.items():
            if seq.unavailable:
                continue
            if reason is not None:
                self._give_up(seq, reason)
                continue
            start, end = tap.query_start_loc[row], tap.query_start_loc[row + 1]
            positions = tap.positions[start:end]
            last = int(positions[-1]) + 1
            if last != seq.context_length() and last >= len(seq.prompt_ids):
                # Hidden states from another step (e.g. a replayed CUDA graph, where forward hooks do not run).
                self._give_up(seq, f"captured hidden states end at position {last}, context has "
                                   f"{seq.context_length()} tokens")
                continue
            if not seq.store(tap.hidden[start:end], positions, self.max_len):
                self._give_up(seq, "part of the prompt came from the prefix cache, so its hidden states were "
                                   "never computed")
                continue
            # A chunk that does not finish the prompt is not ready: vLLM throws its sampled token away.
            if last == seq.context_length():
                ready.append(row)
        if not ready:
            return logits

        temperatures = torch.tensor([self.rows[r].temperature for r in ready], dtype=torch.float32)
        entropy, _, _ = token_stats(logits[ready], temperatures.to(logits.device))
        triggered: list[tuple[int, float, float]] = []
        for row, h in zip(ready, entropy.tolist()):
            fire, tau = self.rows[row].monitor.observe(h)
            if fire:
                triggered.append((row, h, tau))
        if triggered:
            self._correct(logits, triggered)
        return logits

    def _give_up(self, seq: SRGenSequence, reason: str) -> None:
        """Say so in the trace, once, instead of silently decoding without SRGen."""
        seq.unavailable = True
        log.warning("SRGen off for a sequence: %s", reason)
        append_event(seq.key, {"event": "unavailable", "sequence": seq.ordinal, "reason": reason})

    def _correct(self, logits: torch.Tensor, triggered: list[tuple[int, float, float]]) -> None:
        started = time.perf_counter()
        inputs = []
        for row, _, _ in triggered:
            seq = self.rows[row]
            n = seq.context_length()
            ids = torch.tensor(seq.prompt_ids + list(seq.output_ids), dtype=torch.long, device=logits.device)
            inputs.append(ReflectionInput(seq.hidden[:n], ids[:n], seq.temperature, seq.params))
        corrected = reflect(inputs, HIDDEN_STATES.lm_head_weight().to(logits.device))
        seconds = time.perf_counter() - started
        for (row, entropy, tau), new_row in zip(triggered, corrected):
            before = logits[row].clone()
            # Keep whatever the engine had masked (allowed tokens, bad words): delta must not unmask it.
            new_row = new_row.to(logits.dtype).masked_fill(torch.isinf(before) & (before < 0), float("-inf"))
            logits[row] = new_row
            seq = self.rows[row]
            append_event(seq.key, {
                "event": "correction",
                "sequence": seq.ordinal,
                "output_index": len(seq.output_ids),
                "position": seq.context_length(),
                "entropy": round(entropy, 4),
                "threshold": round(tau, 4),
                "token_before": self._describe(before, seq.temperature),
                "token_after": self._describe(new_row, seq.temperature),
                "seconds": round(seconds, 4),
                "batch_rows": len(triggered),
            })

    def _describe(self, row_logits: torch.Tensor, temperature: float) -> dict[str, Any]:
        """The most likely token of a distribution: what greedy decoding picks, and its probability."""
        probs = torch.softmax(row_logits.float() / temperature, dim=-1)
        p, token = probs.max(dim=-1)
        return {"id": int(token), "text": self._decode(int(token)), "prob": round(float(p), 4)}

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer.decode([token_id])
