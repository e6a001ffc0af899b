"""SRGen, the token-statistics sensor and its confidence stop behind vLLM's Model Runner V2 interface (the CUDA
default): state by request slot, committed tokens from the runner.

V2 keeps a request in a persistent slot and says nothing when it leaves (slots are recycled), so every
`add_request` starts the slot afresh; the sequence itself is looked up by its SamplingParams (SRGen's
`SequenceTable`, the sensor's own table), which is how a preempted request, re-added to another slot, keeps its
state. Context lengths come from the host-side arrays the runner keeps (no device sync), token ids from its
committed tokens on the device (never placeholders).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.sampler import Sampler

from refine_server.engine_plugin import admission
from refine_server.engine_plugin.corrector import SRGenCorrector, SRGenRow, make_srgen
from refine_server.engine_plugin.sampler_hook import SAMPLED_TOKENS, wrap_sampler
from refine_server.engine_plugin.sensor import StatsRow, StatsSequence, TokenStatsSensor, make_sensor
from refine_server.engine_plugin.sequences import SRGenSequence
from refine_server.engine_plugin.tap import HIDDEN_STATES


class RefineV2LogitsProcessor(LogitsProcessor):
    validate_params = classmethod(lambda cls, sampling_params: admission.validate(sampling_params))

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self.req_states = req_states
        self.corrector: SRGenCorrector = make_srgen(vllm_config)
        self.sensor: TokenStatsSensor = make_sensor(vllm_config)
        self.slots: list[SRGenSequence | None] = [None] * req_states.max_num_reqs
        self.stats_slots: list[StatsSequence | None] = [None] * req_states.max_num_reqs
        wrap_sampler(Sampler, "__call__")
        SAMPLED_TOKENS.listener = self.sensor.sampled

    def add_request(self, req_idx: int, sampling_params) -> bool:
        # The runner writes the slot's prompt length before it calls the sampler's processors.
        prompt_len = int(self.req_states.prompt_len.np[req_idx])
        self.slots[req_idx] = self.corrector.admit(sampling_params, prompt_len)
        self.stats_slots[req_idx] = self.sensor.admit(sampling_params)
        # True also for the sensor, which changes no logits: V2 calls `apply` only for batches with such a row.
        return self.slots[req_idx] is not None or self.stats_slots[req_idx] is not None

    def apply_staged_writes(self) -> None:
        # Called before each forward: the tap keeps this step's tensors only while some sequence needs them.
        HIDDEN_STATES.active = any(seq is not None and not seq.done for seq in self.slots)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        rows, stats_rows = [], []
        prompt_len = self.req_states.prompt_len.np
        prefill_len = self.req_states.prefill_len.np
        # One logits row per scheduled request, in batch order (speculative decoding is refused at admission).
        for row, slot in enumerate(ctx.idx_mapping_np.tolist()):
            # Tokens visible to this row's sampled token; below the (re)fill length it is a partial chunk.
            visible = int(ctx.seq_lens_upper_bound_np[row])
            seq = self.slots[slot]
            if seq is not None:
                context_len = max(visible, int(prefill_len[slot]))
                rows.append(SRGenRow(row, seq, context_len, self._committed_tokens(slot, context_len)))
            sensed = self.stats_slots[slot]
            if sensed is not None and visible >= prefill_len[slot]:  # vLLM throws a partial chunk's draw away
                stats_rows.append(StatsRow(row, sensed, visible - int(prompt_len[slot])))
        if rows:
            self.corrector.step(logits, rows)
        # After any correction: the statistics describe the distribution the sampler draws from.
        measured = self.sensor.observe(logits, stats_rows)
        # Measured first: the record of a token the stop forces describes the model's own distribution.
        self.sensor.stop.apply(logits, measured)
        HIDDEN_STATES.begin_step()
        return logits

    def _committed_tokens(self, slot: int, length: int):
        return lambda: self.req_states.all_token_ids.gpu[slot, :length]
