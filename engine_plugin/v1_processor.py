"""SRGen, the token-statistics sensor and its confidence stop behind vLLM's V1 logits-processor interface (the
runner the CPU build uses): rows follow BatchUpdate.

V1 keys everything by batch row and tells the processor, before each step, which rows were added, removed or
moved. A row's sequence is looked up by its SamplingParams (SRGen's `SequenceTable`, the sensor's own table),
so a request that leaves the batch for a step and comes back (on any row) carries on where it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
from vllm.v1.sample.sampler import Sampler

from refine_server.engine_plugin import admission
from refine_server.engine_plugin.corrector import SRGenCorrector, SRGenRow, make_srgen
from refine_server.engine_plugin.sampler_hook import SAMPLED_TOKENS, wrap_sampler
from refine_server.engine_plugin.sensor import StatsRow, StatsSequence, TokenStatsSensor, make_sensor
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


@dataclass
class _StatsRow:
    seq: StatsSequence
    # vLLM's live list. Its length is the index of the token this step samples, also under async scheduling,
    # where it holds -1 placeholders of the right count. A partial prompt chunk's draw is discarded by vLLM
    # and recorded here under the same index as the real one, which the later record overwrites.
    output_ids: list[int]


class RefineV1LogitsProcessor(LogitsProcessor):
    validate_params = classmethod(lambda cls, sampling_params: admission.validate(sampling_params))

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.corrector: SRGenCorrector = make_srgen(vllm_config)
        self.sensor: TokenStatsSensor = make_sensor(vllm_config)
        self.rows: dict[int, _Row] = {}
        self.stats_rows: dict[int, _StatsRow] = {}
        wrap_sampler(Sampler, "forward")
        SAMPLED_TOKENS.listener = self.sensor.sampled

    def is_argmax_invariant(self) -> bool:
        return False  # a correction changes which token wins

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for index in batch_update.removed:
                self.rows.pop(index, None)
                self.stats_rows.pop(index, None)
            for index, params, prompt_ids, output_ids in batch_update.added:
                self.rows.pop(index, None)
                self.stats_rows.pop(index, None)
                # Always the lists from the latest `added`: vLLM may hand a re-added request new ones.
                seq = self.corrector.admit(params, len(prompt_ids or ()))
                if seq is not None:
                    self.rows[index] = _Row(seq, list(prompt_ids or ()), output_ids)
                sensed = self.sensor.admit(params)
                if sensed is not None:
                    self.stats_rows[index] = _StatsRow(sensed, output_ids)
            for src, dst, direction in batch_update.moved:
                _move(self.rows, src, dst, direction)
                _move(self.stats_rows, src, dst, direction)
        # The tap keeps this step's tensors only while some row needs them.
        HIDDEN_STATES.active = any(not r.seq.done for r in self.rows.values())

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            rows = [SRGenRow(i, r.seq, r.context_len(), r.token_ids) for i, r in self.rows.items()]
            self.corrector.step(logits, rows)
        # After any correction: the statistics describe the distribution the sampler draws from.
        measured = self.sensor.observe(
            logits, [StatsRow(i, r.seq, len(r.output_ids)) for i, r in self.stats_rows.items()]
        )
        # Measured first: the record of a token the stop forces describes the model's own distribution.
        self.sensor.stop.apply(logits, measured)
        HIDDEN_STATES.begin_step()
        return logits


def _move(rows: dict, src: int, dst: int, direction: MoveDirectionality) -> None:
    moving = rows.pop(src, None)
    other = rows.pop(dst, None)
    if direction == MoveDirectionality.SWAP and other is not None:
        rows[src] = other
    if moving is not None:
        rows[dst] = moving
