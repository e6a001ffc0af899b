"""SRGen behind vLLM's V1 logits-processor interface (the runner the CPU build uses): rows follow BatchUpdate.

V1 keys everything by batch row and tells the processor, before each step, which rows were added, removed or
moved. A row's sequence is looked up by its SamplingParams in the `SequenceTable`, so a request that leaves
the batch for a step and comes back (on any row) carries on where it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from refine_server.engine_plugin import admission
from refine_server.engine_plugin.corrector import SRGenCorrector, SRGenRow, make_srgen
from refine_server.engine_plugin.sequences import SRGenSequence
from refine_server.engine_plugin.tap import HIDDEN_STATES


@dataclass
class _Row:
    seq: SRGenSequence
    prompt_ids: list[int]
    output_ids: list[int]  # vLLM's live list: grows as tokens are sampled

    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self) -> torch.Tensor:
        return torch.tensor(self.prompt_ids + self.output_ids, dtype=torch.long)


class RefineV1LogitsProcessor(LogitsProcessor):
    validate_params = classmethod(lambda cls, sampling_params: admission.validate(sampling_params))

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.corrector: SRGenCorrector = make_srgen(vllm_config)
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # a correction changes which token wins

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, prompt_ids, output_ids in batch_update.added:
                self.rows.pop(index, None)
                seq = self.corrector.admit(params, len(prompt_ids or ()))
                if seq is not None:
                    # Always the list from the latest `added`: vLLM may hand a re-added request a new one.
                    self.rows[index] = _Row(seq, list(prompt_ids or ()), output_ids)
            for src, dst, direction in batch_update.moved:
                moving = self.rows.pop(src, None)
                other = self.rows.pop(dst, None)
                if direction == MoveDirectionality.SWAP and other is not None:
                    self.rows[src] = other
                if moving is not None:
                    self.rows[dst] = moving
        # The tap keeps this step's tensors only while some row needs them.
        HIDDEN_STATES.active = any(not r.seq.done for r in self.rows.values())

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            rows = [SRGenRow(i, r.seq, r.context_len(), r.token_ids) for i, r in self.rows.items()]
            self.corrector.step(logits, rows)
        HIDDEN_STATES.begin_step()
        return logits
