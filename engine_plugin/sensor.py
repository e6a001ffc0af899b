"""The token-statistics sensor: per-token statistics of a request's own next-token distribution, measured in
the engine, for the rows that asked, whichever model runner delivered them.

A request asks with signed `vllm_xargs` naming `TOKEN_STATS` (the proxy's `policies/token_stats.py`). For each
token such a sequence samples, the engine reports the entropy and varentropy of the distribution at the
request's temperature (T = 1 for greedy requests), its top-2 margin, and the probability of the drawn token
under it; and DeepConf's token confidence at T = 1 over the request's top k (`TokenStatsParams.confidence_k`,
signed in `refine_params`): over the whole vocabulary, after the engine's bias, bad words, grammar (and, on V2,
penalties) and any SRGen correction, before temperature and top-k / top-p. A request whose parameters ask for
a confidence stop is stopped by `confidence_stop.py`, from the confidences measured here.

Per step, on the device: `observe` (inside `apply`) copies the asking rows of the logits into a buffer kept
until sampling, and runs the token_stats kernel on them (entropy, varentropy, margin and the log normaliser);
`sampled` (right after the sampler, see `sampler_hook.py`) gathers each drawn token's logit from that buffer,
so its probability is exp(logit / T - lse), and hands the [rows, COLUMNS] result to the writer, which copies it to
the host once and writes it off the sampler's thread (`stats_writer.py`, format in `contract/token_stats_file.py`).

Sequences are kept by their SamplingParams object (as SRGen's are): n > 1 choices each get their own, so they
are separate sequences of one request key, numbered in admission order; a preempted or re-added request finds
its number again. Its tokens are numbered by the runner (`output_index`), so a recomputed token overwrites its
record rather than adding one.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from refine_server.contract.params import MAX_CONFIDENCE_K, MAX_STOP_WINDOW, ConfidenceStopParams, TokenStatsParams
from refine_server.contract.protocol import (
    PARAMS_ARG,
    POLICY_ARG,
    REQUEST_KEY_ARG,
    TOKEN_STATS,
    TOKEN_STATS_ENGINE_ENV,
    events_dir,
)
from refine_server.engine_plugin.admission import confidence_stop_limits
from refine_server.engine_plugin.confidence_stop import ConfidenceStop
from refine_server.engine_plugin.stats_writer import COLUMNS, RecordPlace, StatsWriter
from refine_server.kernels.distribution_stats import token_stats
from refine_server.kernels.token_confidence import token_confidence

log = logging.getLogger(__name__)


class TokenStatsEngineSettings(BaseModel):
    """Set by the operator (`REFINE_ENGINE_TOKEN_STATS`, JSON), read by the plugin."""

    max_rows_per_step: int = Field(
        64,
        ge=1,
        description=(
            "rows measured in one engine step. Each keeps a float32 copy of its logits row until the sampler has "
            "drawn (max_rows_per_step * vocabulary * 4 bytes, allocated on first use, outside vLLM's memory "
            "profile); rows over it get no record that step, and the proxy reports those tokens as missing"
        ),
    )
    max_stop_sequences: int = Field(
        32,
        ge=1,
        description=(
            "sequences with a confidence stop at once. Each keeps a window of float64 sums on the device "
            "((window cap + 2) * 8 bytes); later ones run without the stop (their records say so). At most "
            "max_rows_per_step: their rows are measured first, so a stop never misses a confidence"
        ),
    )

    @model_validator(mode="after")
    def _stops_are_measured(self) -> TokenStatsEngineSettings:
        if self.max_stop_sequences > self.max_rows_per_step:
            raise ValueError("max_stop_sequences must not exceed max_rows_per_step")
        return self


@cache
def token_stats_engine_settings() -> TokenStatsEngineSettings:
    return TokenStatsEngineSettings.model_validate_json(os.environ.get(TOKEN_STATS_ENGINE_ENV) or "{}")


def token_stats_unsupported(vllm_config: Any) -> list[str]:
    """Why this engine cannot report token statistics (worked out once, when the model loads)."""
    reasons = []
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding: vLLM does not run plugin logits processors with it")
    if getattr(vllm_config.parallel_config, "enable_batch_sharded_sampling", False):
        reasons.append("batch-sharded sampling: each rank samples only some requests")
    return reasons


@dataclass
class StatsSequence:
    key: str  # the request key: names the statistics file; n > 1 choices share it
    ordinal: int  # which of the request's sequences this is, in order of admission
    temperature: float  # the distribution is measured at the request's temperature (1.0 for greedy requests)
    confidence_k: int = MAX_CONFIDENCE_K  # k of the token confidence
    stop: ConfidenceStopParams | None = None  # DeepConf's stop, run by confidence_stop.py
    eos_token_id: int | None = None  # the token the stop forces: the request's EOS, else its first stop token


@dataclass(frozen=True)
class StatsRow:
    """One logits row of this step that belongs to a sequence asking for statistics."""

    row: int  # index into this step's logits
    seq: StatsSequence
    output_index: int  # the sampled token's position in the sequence's completion


@dataclass
class _Family:
    admitted: int = 0  # sequences of the request admitted so far: the next one's ordinal
    alive: int = 0


@dataclass
class Measured:
    """What `observe` measured this step, waiting for the sampler's draw; the confidence stop reads it."""

    rows: list[StatsRow]  # the rows measured, in the order of the tensors below
    index: torch.Tensor  # [k] logits rows, on the device
    temperatures: torch.Tensor  # [k] on the device
    confidence: torch.Tensor  # [k] the rows' token confidence (a view of the writer's values)
    stopped: torch.Tensor  # [k] the records' `stopped` column, 0 until the confidence stop sets it
    places: list[RecordPlace]
    rows_needed: int  # the sampler's output must have at least this many rows


def make_sensor(vllm_config: Any) -> TokenStatsSensor:
    """The sensor a logits processor of either runner drives, set up from the engine's config."""
    settings = token_stats_engine_settings()
    return TokenStatsSensor(
        events_dir(),
        vocab_size=vllm_config.model_config.get_vocab_size(),
        capacity=settings.max_rows_per_step,
        reports=_reporting_rank(),
        stop=ConfidenceStop(
            capacity=settings.max_stop_sequences, window_cap=confidence_stop_limits().window or MAX_STOP_WINDOW
        ),
    )


def _eos(sampling_params: Any) -> int | None:
    """The token a confidence stop forces: the request's end-of-sequence, else the first of its stop tokens
    (lowest id, so the choice does not depend on a set's order); None when it has neither."""
    if sampling_params.eos_token_id is not None:
        return int(sampling_params.eos_token_id)
    stops = sorted(sampling_params.all_stop_token_ids or ())
    return stops[0] if stops else None


def _reporting_rank() -> bool:
    """Tensor-parallel ranks all sample the same tokens (vLLM gathers the logits to each): rank 0 reports."""
    from vllm.distributed import parallel_state

    return not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_rank() == 0


class TokenStatsSensor:
    def __init__(
        self,
        folder: Path,
        *,
        vocab_size: int,
        capacity: int,
        reports: bool = True,
        stop: ConfidenceStop | None = None,
    ):
        self.folder = folder
        self.vocab_size = vocab_size
        self.capacity = capacity
        self.reports = reports  # tensor-parallel ranks other than 0 measure (for the stop) but write nothing
        # DeepConf's stop, which the processors run on what `observe` measured (`confidence_stop.py`).
        self.stop = stop if stop is not None else ConfidenceStop(capacity=capacity, window_cap=MAX_STOP_WINDOW)
        self._sequences: dict[int, StatsSequence] = {}  # by id() of the SamplingParams object
        self._families: dict[str, _Family] = {}
        self._pending: Measured | None = None
        self._overflow_logged = False
        # Allocated on the first step that measures anything (most engines never do).
        self._kept: torch.Tensor | None = None  # [capacity, V] float32: the rows' logits until the draw
        self._lse: torch.Tensor | None = None  # [capacity] log normalisers at each row's temperature
        self._values: torch.Tensor | None = None  # [capacity, COLUMNS]: what the writer copies to the host
        self._writer: StatsWriter | None = None

    def __len__(self) -> int:
        return len(self._sequences)

    # ---- sequences -------------------------------------------------------------------------------------

    def admit(self, sampling_params: Any) -> StatsSequence | None:
        """The sequence of a request entering the batch: the one it had (re-added after leaving the batch or
        being preempted), a new one, or None when the request does not ask for statistics."""
        args = sampling_params.extra_args or {}
        if args.get(POLICY_ARG) != TOKEN_STATS:
            return None
        ident = id(sampling_params)
        seq = self._sequences.get(ident)
        if seq is not None:
            return seq
        # Admission checked the signature, key and parameters in the API server.
        key = args[REQUEST_KEY_ARG]
        params = TokenStatsParams.model_validate_json(str(args.get(PARAMS_ARG) or "{}"))
        family = self._families.setdefault(key, _Family())
        temperature = sampling_params.temperature if (sampling_params.temperature or 0) > 1e-5 else 1.0
        seq = StatsSequence(key, family.admitted, temperature, params.confidence_k, params.stop, _eos(sampling_params))
        family.admitted += 1
        family.alive += 1
        self._sequences[ident] = seq
        weakref.finalize(sampling_params, self._forget, ident, seq)  # vLLM dropped the request
        return seq

    def _forget(self, ident: int, seq: StatsSequence) -> None:
        if self._sequences.get(ident) is seq:
            del self._sequences[ident]
        self.stop.release(seq)
        family = self._families.get(seq.key)
        if family is not None:
            family.alive -= 1
            if family.alive <= 0:
                del self._families[seq.key]

    # ---- one step --------------------------------------------------------------------------------------

    def observe(self, logits: torch.Tensor, rows: list[StatsRow]) -> Measured | None:
        """From `apply`, every step (an empty `rows` clears what an interrupted step left): measure the rows'
        distributions and keep their logits for the sampler's draw. `logits` is float32 in both runners.
        Returns what was measured (None: nothing), for the confidence stop."""
        self._pending = None
        if not rows:
            return None
        try:
            self._pending = self._measure(logits, rows)
        except Exception:  # statistics must never take the engine down: this step goes unreported
            log.exception("refine: token statistics failed for a step")
        return self._pending

    def _measure(self, logits: torch.Tensor, rows: list[StatsRow]) -> Measured:
        # Rows with a confidence stop first: over capacity, a row without one loses its record, not a stop
        # its confidence (the settings keep max_stop_sequences <= capacity).
        rows = sorted(rows, key=lambda r: r.seq.stop is None)
        if len(rows) > self.capacity:
            if not self._overflow_logged:
                log.warning(
                    "refine token statistics: %d rows asked in one step, %d measured "
                    "(max_rows_per_step); the rest are reported missing",
                    len(rows),
                    self.capacity,
                )
                self._overflow_logged = True
            rows = rows[: self.capacity]
        kept, lse, values = self._buffers(logits.device)
        k = len(rows)
        index = torch.tensor([r.row for r in rows], dtype=torch.long, device=logits.device)
        temperatures = torch.tensor([r.seq.temperature for r in rows], dtype=torch.float32, device=logits.device)
        confidence_k = torch.tensor([r.seq.confidence_k for r in rows], dtype=torch.long, device=logits.device)
        torch.index_select(logits[:, : self.vocab_size], 0, index, out=kept[:k])
        entropy, varentropy, margin = token_stats(kept[:k], temperatures, lse_out=lse[:k])
        values[:k, 1] = entropy
        values[:k, 2] = varentropy
        values[:k, 3] = margin
        # DeepConf's confidence is at T = 1: where every row samples at T = 1, token_stats' normaliser is it.
        at_t1 = all(r.seq.temperature == 1.0 for r in rows)
        values[:k, 5] = token_confidence(kept[:k], confidence_k, MAX_CONFIDENCE_K, lse=lse[:k] if at_t1 else None)
        values[:k, 6] = 0.0
        places = [RecordPlace(r.seq.key, r.seq.ordinal, r.output_index) for r in rows]
        return Measured(
            rows, index, temperatures, values[:k, 5], values[:k, 6], places, rows_needed=max(r.row for r in rows) + 1
        )

    def sampled(self, token_ids: torch.Tensor) -> None:
        """Right after the sampler: the drawn tokens ([rows, 1], one per logits row) complete the step's records."""
        pending, self._pending = self._pending, None
        if pending is None or not self.reports:
            return
        if token_ids.shape[0] < pending.rows_needed:  # not the draw `observe` measured for: drop the step
            log.warning(
                "refine token statistics: the sampler drew %d rows, the step had %d; step dropped",
                token_ids.shape[0],
                pending.rows_needed,
            )
            return
        assert self._kept is not None and self._lse is not None and self._values is not None and self._writer
        k = len(pending.places)
        tokens = token_ids.reshape(-1)[pending.index].long()
        logit = self._kept[:k].gather(1, tokens[:, None]).squeeze(1)
        values = self._values[:k]
        values[:, 0] = tokens.float()
        values[:, 4] = torch.exp(logit / pending.temperatures - self._lse[:k])
        self._writer.submit(values, pending.places)

    def flush(self) -> None:
        """Block until every record so far is on disk (tests)."""
        if self._writer is not None:
            self._writer.flush()

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._kept is None:
            self._kept = torch.empty((self.capacity, self.vocab_size), dtype=torch.float32, device=device)
            self._lse = torch.empty(self.capacity, dtype=torch.float32, device=device)
            self._values = torch.empty((self.capacity, COLUMNS), dtype=torch.float32, device=device)
            self._writer = StatsWriter(self.folder, self.capacity, device)
        assert self._lse is not None and self._values is not None
        return self._kept, self._lse, self._values
