"""One step of SRGen for the rows of a batch, whichever model runner delivered them.

The runner adapters (`v1_processor.py`, `v2_processor.py`) say which logits rows belong to which SRGen
sequence and how long each context is; this module does the rest: store the step's hidden states by position,
measure entropy, decide which rows trigger, reflect, and add the correction to the engine's logits.

It never makes the engine fall over: a failure inside a correction leaves those rows with the engine's own
logits and the trace says why. A correction is *added* to the logits (lm_head(delta), since logits are
linear in the hidden state), so whatever the engine already applied (logit bias, bad words, grammar masks,
penalties) still holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from refine_server.contract.params import SRGEN, SRGenParams
from refine_server.contract.protocol import FAULT_ARG, PARAMS_ARG, POLICY_ARG, REQUEST_KEY_ARG, events_dir
from refine_server.engine_plugin import admission
from refine_server.engine_plugin.events import EventWriter
from refine_server.engine_plugin.sequences import SequenceTable, SRGenSequence
from refine_server.engine_plugin.srgen import EntropyMonitor, ReflectionInput, reflect
from refine_server.engine_plugin.tap import HIDDEN_STATES, HiddenStateTap
from refine_server.kernels.distribution_stats import token_stats

log = logging.getLogger(__name__)

INJECTED_FAULT = "correction"


@dataclass
class SRGenRow:
    """One logits row of this step that belongs to an SRGen sequence."""

    row: int  # index into this step's logits
    seq: SRGenSequence
    context_len: int  # tokens in the context once this row's input is in: the sampled token is at this index
    token_ids: Callable[[], torch.Tensor]  # the context's committed token ids [context_len], read only if needed


def make_srgen(vllm_config) -> SRGenCorrector:
    """The corrector a logits processor of either runner drives, set up from the engine's config."""
    settings = admission.srgen_engine_settings()
    model = vllm_config.model_config
    return SRGenCorrector(
        HIDDEN_STATES,
        EventWriter(events_dir(), model.tokenizer),
        SequenceTable(settings.max_sequences),
        vocab_size=model.get_vocab_size(),
        max_len=model.max_model_len,
        max_rows_per_step=settings.max_rows_per_step,
    )


class SRGenCorrector:
    def __init__(
        self,
        tap: HiddenStateTap,
        events: EventWriter,
        table: SequenceTable,
        *,
        vocab_size: int,
        max_len: int,
        max_rows_per_step: int,
    ):
        self.tap = tap
        self.events = events
        self.table = table
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.max_rows_per_step = max_rows_per_step

    def admit(self, sampling_params, prompt_len: int) -> SRGenSequence | None:
        """The SRGen sequence of a request entering the batch: the one it had (re-added after leaving the
        batch or being preempted), a new one, or None when the request does not use SRGen."""
        args = sampling_params.extra_args or {}
        if args.get(POLICY_ARG) != SRGEN:
            return None
        seq = self.table.find(sampling_params)
        if seq is not None:  # back after leaving the batch for a step, or after preemption
            self.events.emit(seq.key, {"event": "rejoined", "sequence": seq.ordinal, "filled": seq.filled})
            return seq
        # Admission checked signature, parameters and caps in the API server; parsed again here, in the worker.
        params = SRGenParams.model_validate_json(args.get(PARAMS_ARG, "{}"))
        # Greedy requests have no temperature to measure entropy at: use the model's own distribution.
        temperature = sampling_params.temperature if (sampling_params.temperature or 0) > 1e-5 else 1.0
        fault = args.get(FAULT_ARG) if admission.faults_allowed() else None
        full = self.table.full()
        seq = self.table.add(
            sampling_params,
            key=args[REQUEST_KEY_ARG],
            params=params,
            temperature=temperature,
            prompt_len=prompt_len,
            monitor=EntropyMonitor(params),
            fault=fault,
        )
        self.events.emit(seq.key, {"event": "admitted", "sequence": seq.ordinal})
        if full:
            self.stop(seq, f"this engine already runs SRGen for {self.table.max_sequences} sequences (its limit)")
        return seq

    def stop(self, seq: SRGenSequence, reason: str, event: str = "unavailable") -> None:
        """Switch SRGen off for one sequence and say so in its trace, once, instead of decoding silently."""
        if seq.stopped is None:
            seq.stopped = reason
            seq.release()
            log.warning("SRGen off for a sequence: %s", reason)
            self.events.emit(seq.key, {"event": event, "sequence": seq.ordinal, "reason": reason})

    def step(self, logits: torch.Tensor, rows: list[SRGenRow]) -> None:
        rows = [r for r in rows if not r.seq.done]
        if not rows:
            return
        ready = [r for r in rows if self._store_hidden(logits, r)]
        # The first token after the prompt is not monitored (as in the official code, which monitors decode steps).
        monitored = [r for r in ready if r.context_len > r.seq.prompt_len]
        if not monitored:
            return
        temperatures = torch.tensor([r.seq.temperature for r in monitored], dtype=torch.float32, device=logits.device)
        entropy, _, _ = token_stats(logits[[r.row for r in monitored]], temperatures)
        triggered: list[tuple[SRGenRow, float, float]] = []
        for r, h in zip(monitored, entropy.tolist()):
            fire, tau = r.seq.monitor.observe(h)
            if fire:
                triggered.append((r, h, tau))
        if not triggered:
            return
        for r, h, _ in triggered[self.max_rows_per_step :]:
            # Over the per-step limit: decoded uncorrected, the budget not spent, and the trace says so.
            r.seq.monitor.refund()
            self.events.emit(
                r.seq.key,
                {
                    "event": "skipped",
                    "sequence": r.seq.ordinal,
                    "output_index": r.context_len - r.seq.prompt_len,
                    "entropy": round(h, 4),
                    "reason": f"more than {self.max_rows_per_step} rows triggered this step",
                },
            )
        self._correct(logits, triggered[: self.max_rows_per_step])
        self.events.flush()

    # ---- hidden states -------------------------------------------------------------------------------

    def _store_hidden(self, logits: torch.Tensor, r: SRGenRow) -> bool:
        """Store what this step computed for the row's sequence. True when the row samples a kept token
        with every context position's hidden state in hand."""
        seq, missing = r.seq, r.context_len - r.seq.filled
        sampled = self.tap.sampled
        if missing == 1 and sampled is not None and sampled.shape[0] == logits.shape[0]:
            return seq.store(sampled[r.row : r.row + 1], r.context_len - 1, self.max_len)
        if missing <= 0:
            return True
        capture = self.tap.forward
        if capture is None or capture.query_start_loc is None:
            self.stop(
                seq,
                "this step's prompt hidden states were not captured (a full CUDA graph replay, or an "
                "attention backend without query_start_loc)",
            )
            return False
        start, end, first = capture.host_rows[r.row]
        if end <= start:
            return False
        if not seq.store(capture.hidden[start:end], first, self.max_len):
            self.stop(seq, "part of the context came from the prefix cache, so its hidden states were never computed")
            return False
        # A chunk that does not finish the prompt is not ready: vLLM throws its sampled token away.
        return seq.filled >= r.context_len

    # ---- corrections ---------------------------------------------------------------------------------

    def _correct(self, logits: torch.Tensor, triggered: list[tuple[SRGenRow, float, float]]) -> None:
        inputs, kept = [], []
        for r, h, tau in triggered:
            ids = r.token_ids()[: r.context_len].to(device=logits.device, dtype=torch.long)
            if ids.numel() != r.context_len or bool(((ids < 0) | (ids >= self.vocab_size)).any()):
                self.stop(
                    r.seq,
                    "the engine had not committed this sequence's last tokens (placeholders under "
                    "async scheduling of the V1 runner)",
                )
                continue
            # Hidden states are freed only once a sequence is done (stopped, or its budget spent): step() skips those.
            assert r.seq.hidden is not None
            inputs.append(ReflectionInput(r.seq.hidden[: r.context_len], ids, r.seq.temperature, r.seq.params))
            kept.append((r, h, tau))
        if not kept:
            return
        started = time.perf_counter()
        weight = self.tap.lm_head_weight(self.vocab_size)
        try:
            if any(r.seq.fault == INJECTED_FAULT for r, _, _ in kept):
                raise RuntimeError("injected fault (test engine)")
            deltas = reflect(inputs, weight)
            shifts = (deltas.to(weight.dtype) @ weight.T).float()
        except Exception as exc:  # out of memory included: the engine keeps serving, these rows go uncorrected
            log.exception("SRGen correction failed")
            for r, _, _ in kept:
                self.stop(r.seq, f"a correction failed: {type(exc).__name__}: {exc}"[:300], event="failed")
            return
        seconds = time.perf_counter() - started
        for (r, h, tau), shift in zip(kept, shifts):
            before = self._top_token(logits[r.row], r.seq.temperature)
            logits[r.row] += shift
            self.events.emit(
                r.seq.key,
                {
                    "event": "correction",
                    "sequence": r.seq.ordinal,
                    "output_index": r.context_len - r.seq.prompt_len,
                    "position": r.context_len,
                    "entropy": round(h, 4),
                    "threshold": round(tau, 4),
                    "token_before": before,
                    "token_after": self._top_token(logits[r.row], r.seq.temperature),
                    "seconds": round(seconds, 4),
                    "batch_rows": len(kept),
                },
            )
            if r.seq.done:
                r.seq.release()

    @staticmethod
    def _top_token(row: torch.Tensor, temperature: float) -> dict[str, float | int]:
        """The most likely token of a distribution (what greedy decoding picks) and its probability."""
        p, token = torch.softmax(row.float() / temperature, dim=-1).max(dim=-1)
        return {"id": int(token), "prob": round(float(p), 4)}
