"""SRGen's state per sequence, kept by request rather than by batch row or slot.

vLLM moves a request between rows (V1) or slots (V2), takes it out of the batch for a step when the token budget
runs out, and preempts it (V2: frees its slot, then re-adds it). Its `SamplingParams` object stays the same
through all of that, and n>1 choices each get their own copy, so the table keys sequences by that object:
a request that comes back finds its monitor history, correction budget and hidden states where it left them.
A weak reference drops the state when vLLM drops the request.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from refine_server.contract.params import SRGenParams
from refine_server.engine_plugin.srgen import EntropyMonitor


@dataclass
class SRGenSequence:
    key: str  # the request key: names the event file; n>1 choices share it
    ordinal: int  # which of the request's choices this is, in order of arrival
    params: SRGenParams
    temperature: float  # entropy is measured at the request's temperature (1.0 for greedy requests)
    prompt_len: int
    monitor: EntropyMonitor
    fault: str | None = None  # a test-only injected failure (engines started with faults allowed)
    stopped: str | None = None  # why SRGen is off for this sequence, once it is
    hidden: torch.Tensor | None = None  # [capacity, d]: final hidden states by absolute position
    filled: int = 0  # positions [0, filled) are in `hidden`
    family: list[SRGenSequence] = field(default_factory=list, repr=False)  # every choice of the request

    @property
    def done(self) -> bool:
        """Nothing left to do: stopped, or every correction of the budget spent."""
        return self.stopped is not None or self.monitor.corrections >= self.params.max_corrections

    def store(self, rows: torch.Tensor, first_position: int, max_len: int) -> bool:
        """Keep the hidden states of positions first_position.. by position, so a recomputed sequence
        overwrites rather than appends. False when that leaves a gap that no sibling can fill."""
        if first_position > self.filled and not self._copy_prompt_from_sibling(first_position, max_len):
            return False
        self._write(rows, first_position, max_len)
        return True

    def release(self) -> None:
        """Free the hidden states (the budget is spent, or SRGen stopped): the largest thing SRGen holds."""
        self.hidden = None

    def _write(self, rows: torch.Tensor, first: int, max_len: int) -> None:
        last = first + rows.shape[0]
        if self.hidden is None or self.hidden.shape[0] < last:
            capacity = min(max_len, max(64, 2 * last))
            grown = torch.empty((capacity, rows.shape[1]), dtype=rows.dtype, device=rows.device)
            if self.hidden is not None:
                grown[: self.filled] = self.hidden[: self.filled]
            self.hidden = grown
        self.hidden[first:last] = rows
        self.filled = max(self.filled, last)

    def _copy_prompt_from_sibling(self, upto: int, max_len: int) -> bool:
        """n>1 choices share one cache salt, so a later choice reuses an earlier one's cached prompt blocks and
        vLLM never recomputes their hidden states: they are the same positions of the same prompt, so copy them."""
        if upto > self.prompt_len:
            return False
        for other in self.family:
            if other is not self and other.hidden is not None and other.filled >= upto:
                self._write(other.hidden[self.filled : upto], self.filled, max_len)
                return True
        return False


class SequenceTable:
    def __init__(self, max_sequences: int):
        self.max_sequences = max_sequences
        self._by_params: dict[int, SRGenSequence] = {}
        self._by_key: dict[str, list[SRGenSequence]] = {}

    def __len__(self) -> int:
        return len(self._by_params)

    def find(self, sampling_params: object) -> SRGenSequence | None:
        return self._by_params.get(id(sampling_params))

    def full(self) -> bool:
        """As many sequences are still running SRGen as the engine allows."""
        return sum(1 for s in self._by_params.values() if not s.done) >= self.max_sequences

    def add(self, sampling_params: object, **fields) -> SRGenSequence:
        """A new sequence for this request (its params object)."""
        family = self._by_key.setdefault(fields["key"], [])
        seq = SRGenSequence(ordinal=len(family), family=family, **fields)
        family.append(seq)
        ident = id(sampling_params)
        self._by_params[ident] = seq
        weakref.finalize(sampling_params, self._forget, ident, seq)
        return seq

    def _forget(self, ident: int, seq: SRGenSequence) -> None:
        if self._by_params.get(ident) is seq:
            del self._by_params[ident]
        family = self._by_key.get(seq.key, [])
        if seq in family:
            family.remove(seq)
        if not family:
            self._by_key.pop(seq.key, None)
