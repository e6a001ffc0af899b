"""DeepConf's online stop inside the engine (arXiv 2508.15260): a sequence whose recent tokens lost confidence
may only end.

A request asks with `TokenStatsParams.stop` in the sensor's signed parameters: `threshold`, `window`,
`stop_after`. At the step that samples token t of such a sequence, the group confidence is the mean token
confidence C over its tokens [max(0, t - window), t) (what the sensor measured at the steps that drew them;
`policies/confidence.group_confidences(C, window)[t - 1]`). When t >= stop_after and that mean is below the
threshold, every logit of the row but its end-of-sequence token becomes -inf: the sequence ends this step, so
the client sees a normal finish ("stop"). The sensor measured the row before this forcing, so the forced token's
record describes the model's own distribution; its `stopped` column is set to 1, which is how the proxy learns
where the sequence stopped, with no other channel.

State per sequence lives on the device: a ring of float64 prefix sums of C by output position (S[p] = sum of
C over positions < p; the ring keeps window cap + 2 of them, enough for S[t] and S[t - window]). Writing
S[t + 1] = S[t] + C[t] is idempotent, so a position measured twice (a partial prompt chunk's discarded draw, a
preempted sequence recomputed) only overwrites its own entry. Per step: two small host-to-device copies of the
rows' indices and thresholds, a few gathers, and one masked copy of the stop rows' logits, all queued on the
device; nothing waits for it (on a GPU the decision is never read back on the host). On CPU, where nothing
waits either way, only the rows that stop are written.

A stop never leaves a row with nothing to sample: it forces only where the row's end-of-sequence logit is
finite at that moment (vLLM's min_tokens, bad words, allowed_token_ids, logit bias and, in V1, the grammar's
bitmask have run before refine's processor, in both runners); otherwise the stop waits for a later step.
`ignore_eos` can never end by EOS and is refused at admission. The forced token is the request's
`eos_token_id`, else the lowest of its stop token ids (`sensor._eos`).

Where this differs from the paper: the paper stops a trace "as soon as" its group confidence falls below s;
here the window that decides at step t ends at token t - 1, so the sequence ends with EOS at the step after
the window fell (the forced EOS is one extra token, in `token_ids`, not in the text). C is measured on the
logits the sampler sees (after logit bias, bad words, SRGen and, on V2, penalties) where the authors read
vLLM's `top_logprobs` (by default the raw model output); for a plain request they are the same numbers. A
sequence that finds no free slot (`max_stop_sequences`) runs without the stop, and its records say so
(`stopped` = -1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refine_server.contract.params import ConfidenceStopParams

if TYPE_CHECKING:  # the sensor owns the stop (it admits and forgets the sequences both keep)
    from refine_server.engine_plugin.sensor import Measured, StatsSequence

log = logging.getLogger(__name__)

# The stop's `stopped` column: the stop forced this token / the sequence runs without its stop (no free slot).
FORCED = 1.0
NO_SLOT = -1.0


@dataclass(frozen=True)
class _StopRow:
    measured_at: int  # index into the step's measured rows (the sensor's tensors)
    row: int  # index into this step's logits
    slot: int
    position: int  # t: the output index of the token this step samples
    stop: ConfidenceStopParams
    eos_token_id: int


class ConfidenceStop:
    def __init__(self, *, capacity: int, window_cap: int):
        self.capacity = capacity
        self.ring = window_cap + 2  # holds S[t - window] .. S[t + 1]
        self._slots: dict[int, int] = {}  # by id() of the sensor's StatsSequence; -1: runs without a slot
        self._free = list(range(capacity - 1, -1, -1))
        self._prefix: torch.Tensor | None = None  # [capacity, ring] float64, allocated on first use
        self._full_logged = False

    def __len__(self) -> int:
        """Sequences holding a slot."""
        return sum(1 for slot in self._slots.values() if slot >= 0)

    def apply(self, logits: torch.Tensor, measured: Measured | None) -> None:
        """After the sensor measured this step's rows: update the stop rows' sums and force end-of-sequence
        in the rows whose window mean fell below their threshold."""
        if measured is None:
            return
        rows: list[_StopRow] = []
        waived: list[int] = []
        for at, stats_row in enumerate(measured.rows):
            seq = stats_row.seq
            if seq.stop is None:
                continue
            slot = self._slot(seq, logits.device)
            if slot < 0 or seq.eos_token_id is None:
                waived.append(at)
                continue
            rows.append(_StopRow(at, stats_row.row, slot, stats_row.output_index, seq.stop, seq.eos_token_id))
        if waived:
            measured.stopped[torch.tensor(waived, device=logits.device)] = NO_SLOT
        if rows:
            self._step(logits, measured, rows)

    def _step(self, logits: torch.Tensor, measured: Measured, rows: list[_StopRow]) -> None:
        assert self._prefix is not None
        device = logits.device
        at, row, slot, t, window, first, eos = torch.tensor(
            [
                [r.measured_at for r in rows],
                [r.row for r in rows],
                [r.slot for r in rows],
                [r.position for r in rows],
                [r.stop.window for r in rows],
                [r.stop.first_check for r in rows],
                [r.eos_token_id for r in rows],
            ],
            dtype=torch.long,
            device=device,
        )
        threshold = torch.tensor([r.stop.threshold for r in rows], dtype=torch.float64, device=device)
        start = (t - window).clamp(min=0)
        before = self._prefix[slot, t % self.ring]  # S[t]
        mean = (before - self._prefix[slot, start % self.ring]) / (t - start).clamp(min=1)
        self._prefix[slot, (t + 1) % self.ring] = before + measured.confidence[at].double()
        eos_logit = logits[row, eos]
        fire = (t >= first) & (mean < threshold) & torch.isfinite(eos_logit)
        (force_eos_on_host if device.type == "cpu" else force_eos_on_device)(logits, row, eos, eos_logit, fire)
        measured.stopped[at] = fire.to(measured.stopped.dtype) * FORCED

    def _slot(self, seq: StatsSequence, device: torch.device) -> int:
        """The sequence's slot, taken at its first step (its sums start at position 0); -1 when none was free
        then, for the rest of its life (its earlier confidences would be missing from a later slot)."""
        ident = id(seq)
        slot = self._slots.get(ident)
        if slot is not None:
            return slot
        if self._prefix is None:
            self._prefix = torch.zeros((self.capacity, self.ring), dtype=torch.float64, device=device)
        if self._free:
            slot = self._free.pop()
            self._prefix[slot, 0] = 0.0  # S[0]: the only entry read before it is written
        else:
            slot = -1
            if not self._full_logged:
                log.warning(
                    "refine confidence stop: %d sequences hold every slot (max_stop_sequences); later ones run "
                    "without the stop",
                    self.capacity,
                )
                self._full_logged = True
        self._slots[ident] = slot
        return slot

    def release(self, seq: StatsSequence) -> None:
        """The sensor forgot the sequence (vLLM dropped its request): its slot is free again."""
        slot = self._slots.pop(id(seq), None)
        if slot is not None and slot >= 0:
            self._free.append(slot)


def force_eos_on_device(
    logits: torch.Tensor, row: torch.Tensor, eos: torch.Tensor, eos_logit: torch.Tensor, fire: torch.Tensor
) -> None:
    """Where `fire`, every logit of the row but its EOS to -inf; decided on the device, so the stop rows are
    copied, masked and written back whole whether they stop or not (nothing waits to learn which do)."""
    selected = logits.index_select(0, row)
    selected.masked_fill_(fire[:, None], float("-inf")).scatter_(1, eos[:, None], eos_logit[:, None])
    logits.index_copy_(0, row, selected)


def force_eos_on_host(
    logits: torch.Tensor, row: torch.Tensor, eos: torch.Tensor, eos_logit: torch.Tensor, fire: torch.Tensor
) -> None:
    """The same on CPU tensors, where reading `fire` costs no wait: only the rows that stop are written (on a
    152k vocabulary, copying 8 rows back and forth every step was a few percent of a CPU decode step)."""
    for i in fire.nonzero().flatten().tolist():
        r = int(row[i])
        logits[r].fill_(float("-inf"))
        logits[r, int(eos[i])] = eos_logit[i]
