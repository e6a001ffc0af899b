"""DeepConf online ("Deep Think with Confidence", Fu, Wang, Tian, Zhao, arXiv 2508.15260): sample reasoning
traces, stop the ones whose confidence drops while they are generated, and vote with confidence weights.

**Measures** (`policies/confidence.py`): a token's confidence C_i = -(1/k) * sum of the k largest log
probabilities at position i (k = 20); a group confidence is the mean C over a sliding window of `window`
tokens; a trace's score is its lowest group confidence (windows count once full; a shorter trace is one group).

**The loop** (the authors' reproduce script, `deepconf-online.py`, and the paper's Algorithm 2):
1. Warmup: `warmup` traces in one engine call (n = warmup), in full, the sensor measuring each token's C.
2. The threshold s: the 90th (`variant` "low") or 10th ("high") percentile of the warmup traces' lowest group
   confidences, numpy's linear interpolation, in the script's direction (not the pip wrapper's inverted one).
   A fixed `threshold` skips the warmup (the script's predefined thresholds).
3. Further traces in batches (n = `batch_size` per engine call, each call its own seed), each with the stop at
   s: once `stop_after` tokens exist (default `window`) and the window mean falls below s, the trace may only
   end. Inside vLLM (refine's plugin) the sampler allows only end-of-sequence from then on; without the plugin
   the proxy streams the trace with `top_logprobs` = k and aborts it (`streamed.py`); `sensor_source` says which.
4. The vote: a trace votes when it has an answer and its lowest group confidence is at least s, warmup and
   later traces alike, with its lowest group confidence as weight. That is the reproduce script's rule: it
   drops warmup traces below s and later traces whose lowest group confidence is below s, so a trace stopped
   early never votes (its text ends where the stop cut it). Traces too short to fill a window are never
   stopped, but vote only at or above s too, as in the script.
5. The problem-level stop (the paper's adaptive sampling): after the warmup and after each batch, the leading
   answer's share of the vote's weight; once it reaches `tau`, no more traces are drawn; else up to `max_traces`.

**Choices where the paper leaves room, or a small model needs another value** (each in `params.py`):
- Defaults scaled for the bundled CPU models: warmup 4 (paper 16), max_traces 16 (script 256, paper 512),
  window 64 (paper 2048: their answers are tens to a few hundred tokens, so 2048 would never fill),
  max_trace_tokens 256; k 20, temperature 0.6 and top_p 0.95 are the scripts'.
- `variant` defaults to "high": with 4 warmup traces the 90th percentile admits only the most confident one, so
  "low" would decide on that one trace whenever it answers (its consensus is 1 at once). "low" stays available.
- The paper checks the consensus after every trace; traces here come in batches (concurrent in vLLM, sharing
  the prompt's prefix), so the check runs after each batch: at most `batch_size` - 1 traces more than the
  paper would draw.
- `vote: "majority"` (weight 1 each) and `early_stop: false` (no stop, every trace with an answer votes) make
  the same policy self-consistency, graded the same way (bench/quality.py's arm).
- When no trace reaches s with an answer (a fixed threshold above every trace, say), every trace with an
  answer votes, and the trace says `vote_fallback`: an answer from the traces drawn beats none.
- An upstream that reports no confidence at all (no logprobs in its answers: not vLLM) leaves DeepConf its
  vote alone: no threshold, no stop, one vote per answer, and the trace says `confidence_missing`.
- Answers are read by CyberV's extractor (`answer_extraction.extract_answer`: a marked answer, else the last
  number or option); the trace returned is the most confident voter for the winning answer, so its text states
  the chosen answer (the extractor read it there). Without any answer, the most confident trace is returned.
- The prompt is the client's conversation as sent (DeepConf changes no prompt); its sampling (temperature,
  top_p, stop, ...) is DeepConf's own; `max_tokens` caps each trace; `seed` seeds every call; `n` must be 1.
- Metrics: traces drawn and stopped per request, and the tokens saved: each stopped trace against the mean
  length of the traces that ran in full, and each trace left undrawn by the consensus stop at that mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal

from refine_server.contract.params import ConfidenceStopParams, TokenStatsParams
from refine_server.policies.answer_extraction import Answer, extract_answer, question_options
from refine_server.policies.base import (
    EXTRA_TOKENS,
    STOPPED_TRACES,
    TOKENS_SAVED,
    TRACES,
    Policy,
    PolicyCall,
    PolicyRequestError,
)
from refine_server.policies.confidence import (
    TraceConfidence,
    threshold_from_warmup,
    trace_confidence,
    weighted_vote,
)
from refine_server.policies.deepconf.params import DeepConfLimits, DeepConfParams
from refine_server.policies.deepconf.streamed import StreamedTrace, WindowStop, read_trace
from refine_server.policies.engine_client import run_together
from refine_server.policies.response_bodies import AnswerShapes, split_for_streaming

Phase = Literal["warmup", "final"]


@dataclass(frozen=True)
class Question:
    """What DeepConf answers: the client's conversation, as sent, and the options its question lists."""

    messages: list[dict[str, Any]]
    options: dict[str, str]

    def read(self, text: str) -> Answer | None:
        return extract_answer(text, options=self.options)


def read_question(call: PolicyCall) -> Question:
    request = call.request
    request.require_one_choice("deepconf", "returns one voted answer")
    if request.endpoint == "chat":
        _, text = request.question("deepconf")
        messages = list(request.messages or ())
    else:
        if not isinstance(request.prompt, str):
            raise PolicyRequestError(
                "policy deepconf needs the prompt as one string (not a list or token ids)", "prompt"
            )
        text = request.prompt
        messages = [{"role": "user", "content": text}]
    if not text.strip():
        raise PolicyRequestError(
            "policy deepconf needs a question, and this one has no text",
            "messages" if request.endpoint == "chat" else "prompt",
        )
    return Question(messages, question_options(text))


@dataclass(frozen=True)
class Generated:
    """What the engine wrote for one trace and what the stop did, whichever side (engine or proxy) measured."""

    text: str
    finish_reason: str | None
    tokens: int
    confidences: list[float]
    stopped_at: int | None
    stop_waived: bool = False  # the engine ran it without its stop (every stop slot was taken)


@dataclass
class ReasoningTrace:
    """One sampled trace, its scores and its part in the vote."""

    index: int
    phase: Phase
    text: str
    finish_reason: str | None
    tokens: int
    confidence: TraceConfidence
    stopped_at: int | None  # where the confidence stop ended it (the token it forced, or the proxy cut at)
    answer: Answer | None
    votes: bool = False
    weight: float = 0.0
    stop_waived: bool = False

    def trace(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "phase": self.phase,
            "answer": self.answer.value if self.answer else None,
            "answer_kind": self.answer.kind if self.answer else None,
            "votes": self.votes,
            "weight": _round4(self.weight) if self.votes else 0.0,
            **self.confidence.as_dict(),
            "stopped_low_confidence": self.stopped_at is not None,
            "stopped_at": self.stopped_at,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            **({"stop_waived": True} if self.stop_waived else {}),
        }


class DeepConfRun:
    """One request: the warmup, the threshold, the stopped batches, the vote, the answer."""

    def __init__(self, call: PolicyCall, params: DeepConfParams):
        self.call = call
        self.params = params
        self.question = read_question(call)
        self.engine = call.engine
        self.shapes = AnswerShapes(call.request.endpoint, call.request.model)
        self.traces: list[ReasoningTrace] = []
        self.threshold: float | None = params.threshold
        self.sensor_source: Literal["engine", "top_logprobs"] = "top_logprobs"
        self.answer: Answer | None = None
        self.consensus = 0.0
        self.vote_fallback = False
        self.confidence_missing = False  # the upstream reported no confidence: majority vote, no stop

    @property
    def max_tokens(self) -> int:
        cap = self.call.request.max_tokens
        return min(self.params.max_trace_tokens, cap) if cap else self.params.max_trace_tokens

    @property
    def consensus_reached(self) -> bool:
        return self.params.tau is not None and self.consensus >= self.params.tau

    # -- drawing --

    async def draw(self) -> AsyncGenerator[dict[str, Any], None]:
        """Draw traces until the consensus or the budget; yields a progress record after each engine round."""
        p = self.params
        if p.sensor == "auto" and await self.engine.token_stats_unavailable() is None:
            self.sensor_source = "engine"
        if self.threshold is None:
            await self._batch("warmup", p.warmup, stop=None)
            try:
                self.threshold = threshold_from_warmup([t.confidence.lowest_group for t in self.traces], p.variant)
            except ValueError:
                # An upstream that sends no logprobs: what is left of DeepConf is its vote, unweighted.
                self.confidence_missing = True
            self._vote()
            yield self.progress("warmup_done")
        asked = len(self.traces)  # counted by what was asked, so that a short answer cannot loop forever
        while not self.consensus_reached and asked < p.max_traces:
            count = min(p.batch_size, p.max_traces - asked)
            asked += count
            await self._batch("final", count, stop=self.threshold if p.early_stop else None)
            self._vote()
            yield self.progress("batch_done")

    async def _batch(self, phase: Phase, count: int, stop: float | None) -> None:
        sampling = {"temperature": self.params.temperature, "top_p": self.params.top_p, "max_tokens": self.max_tokens}
        if self.sensor_source == "engine":
            drawn = await self._engine_batch(phase, count, stop, sampling)
        else:
            drawn = await run_together(*(self._streamed(phase, stop, sampling) for _ in range(count)))
        for g in drawn:
            self.traces.append(
                ReasoningTrace(
                    len(self.traces),
                    phase,
                    g.text,
                    g.finish_reason,
                    g.tokens,
                    trace_confidence(g.confidences, self.params.window),
                    g.stopped_at,
                    self.question.read(g.text),
                    stop_waived=g.stop_waived,
                )
            )

    async def _engine_batch(
        self, phase: Phase, count: int, stop: float | None, sampling: dict[str, Any]
    ) -> list[Generated]:
        """`count` traces in one engine call, the engine measuring each token's confidence and, with `stop`,
        ending a trace whose window mean falls below it."""
        p = self.params
        sensor = TokenStatsParams(
            confidence_k=p.confidence_k,
            stop=None
            if stop is None
            else ConfidenceStopParams(threshold=stop, window=p.window, stop_after=p.stop_after),
        )
        result, stats = await self.engine.chat_with_token_stats(
            phase, self.question.messages, sensor=sensor, n=count, seed=self.engine.next_seed(), **sampling
        )
        drawn = []
        for choice in sorted(result["choices"], key=lambda c: c.get("index", 0)):
            s = stats[choice.get("index", 0)]
            text = (choice.get("message") or {}).get("content") or ""
            drawn.append(
                Generated(
                    text, choice.get("finish_reason"), len(s.token_ids), list(s.confidence), s.stopped_at, s.stop_waived
                )
            )
        return drawn

    async def _streamed(self, phase: Phase, stop: float | None, sampling: dict[str, Any]) -> Generated:
        """One trace streamed with `top_logprobs` = k, the proxy measuring and, with `stop`, aborting it."""
        p = self.params
        monitor = None if stop is None else WindowStop(stop, p.window, p.first_check)
        chunks = self.engine.stream_chat(
            phase,
            self.question.messages,
            logprobs=True,
            top_logprobs=p.confidence_k,
            seed=self.engine.next_seed(),
            **sampling,
        )
        trace: StreamedTrace = await read_trace(chunks, p.confidence_k, monitor)
        return Generated(trace.text, trace.finish_reason, len(trace.confidences), trace.confidences, trace.stopped_at)

    # -- the vote --

    def _vote(self) -> None:
        """Who votes and with what weight, the leading answer and its share of the weight (the consensus)."""
        p, s = self.params, self.threshold
        assert s is not None or self.confidence_missing, "the threshold is set before any vote"
        for t in self.traces:
            low = t.confidence.lowest_group
            confident = s is None or not p.early_stop or (not math.isnan(low) and low >= s)
            t.votes = t.answer is not None and confident
        self.vote_fallback = not any(t.votes for t in self.traces)
        if self.vote_fallback:
            for t in self.traces:
                t.votes = t.answer is not None
        for t in self.traces:
            weighted = p.vote == "confidence" and not self.confidence_missing
            t.weight = (t.confidence.lowest_group if weighted else 1.0) if t.votes else 0.0
        voters = [t for t in self.traces if t.votes]
        # Answers are equal by kind and value; the vote counts them by both, so that "4" the number and "4"
        # a text never pool.
        keys = [f"{t.answer.kind}:{t.answer.value}" if t.answer else None for t in voters]
        winner, self.consensus = weighted_vote(keys, [t.weight for t in voters])
        self.answer = next((t.answer for t, key in zip(voters, keys) if key == winner), None)

    @property
    def chosen(self) -> ReasoningTrace:
        """The most confident voter for the winning answer; without an answer, the most confident trace."""
        pool = [t for t in self.traces if t.votes and t.answer == self.answer] if self.answer else self.traces
        return max(pool, key=lambda t: _or_lowest(t.confidence.lowest_group))

    # -- what it cost and saved --

    def tokens_saved(self) -> dict[str, int]:
        """Estimated completion tokens saved: each stopped trace against the mean length of the traces that
        ran in full, and each trace the consensus stop left undrawn at that mean (none ran in full: the
        generation cap)."""
        full = [t.tokens for t in self.traces if t.stopped_at is None]
        mean_full = statistics.fmean(full) if full else float(self.max_tokens)
        stopped = sum(max(0.0, mean_full - t.tokens) for t in self.traces if t.stopped_at is not None)
        undrawn = (self.params.max_traces - len(self.traces)) * mean_full if self.consensus_reached else 0.0
        return {"stopped_traces": round(stopped), "undrawn_traces": round(undrawn), "total": round(stopped + undrawn)}

    def fill_trace(self) -> None:
        p = self.params
        saved = self.tokens_saved()
        stopped = sum(t.stopped_at is not None for t in self.traces)
        answers: dict[Answer, list[ReasoningTrace]] = {}
        for t in self.traces:
            if t.votes and t.answer is not None:
                answers.setdefault(t.answer, []).append(t)
        chosen = self.chosen
        self.call.trace.data = {
            "traces": [t.trace() for t in self.traces],
            "answers": sorted(
                (
                    {
                        "answer": a.value,
                        "kind": a.kind,
                        "weight": _round4(sum(t.weight for t in ts)),
                        "traces": [t.index for t in ts],
                    }
                    for a, ts in answers.items()
                ),
                key=lambda entry: -entry["weight"],
            ),
            "summary": {
                "traces_drawn": len(self.traces),
                "warmup": sum(t.phase == "warmup" for t in self.traces),
                "stopped_early": stopped,
                "voters": sum(t.votes for t in self.traces),
                "vote_fallback": self.vote_fallback,
                **({"confidence_missing": True} if self.confidence_missing else {}),
                "threshold": _round4(self.threshold),
                "threshold_source": "given" if p.threshold is not None else f"warmup ({p.variant})",
                "consensus": _round4(self.consensus),
                "consensus_reached": self.consensus_reached,
                "tokens_saved_estimate": saved,
                "sensor_source": self.sensor_source,
            },
            "chosen": {"trace": chosen.index, "answer": self.answer.value if self.answer else None},
            "rounds": {
                purpose: {"engine_calls": c.calls, "completion_tokens": c.completion_tokens}
                for purpose, c in self.engine.spend.by_purpose.items()
            },
        }
        trace = self.call.trace
        trace.record(TRACES, len(self.traces))
        trace.record(STOPPED_TRACES, stopped)
        trace.record(TOKENS_SAVED, saved["total"])
        trace.record(EXTRA_TOKENS, self.engine.spend.completion_tokens - chosen.tokens)

    # -- the answer --

    def response(self) -> dict[str, Any]:
        chosen = self.chosen
        return self.shapes.response(chosen.text, chosen.finish_reason, self.engine.usage())

    def progress(self, stage: str) -> dict[str, Any]:
        return {
            "stage": stage,
            "traces": len(self.traces),
            "stopped": sum(t.stopped_at is not None for t in self.traces),
            "threshold": _round4(self.threshold),
            "answer": self.answer.value if self.answer else None,
            "consensus": _round4(self.consensus),
        }

    def answer_chunks(self) -> list[dict[str, Any]]:
        """The chosen text in pieces of a few words (the first with the role), then the finishing chunk."""
        chosen = self.chosen
        chunks = [self.shapes.piece(piece, first=i == 0) for i, piece in enumerate(split_for_streaming(chosen.text))]
        chunks.append(self.shapes.finish(chosen.finish_reason))
        if self.call.request.include_usage:
            chunks.append(self.shapes.chunk([], usage=self.engine.usage()))
        return chunks


def _round4(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)


def _or_lowest(value: float) -> float:
    return -math.inf if math.isnan(value) else value


class DeepConfPolicy(Policy[DeepConfParams]):
    name = "deepconf"
    Params = DeepConfParams
    Limits = DeepConfLimits
    metrics = (*Policy.metrics, TRACES, STOPPED_TRACES, TOKENS_SAVED, EXTRA_TOKENS)
    refuses_fields = ("tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "echo")

    async def complete(self, call: PolicyCall, params: DeepConfParams) -> dict[str, Any]:
        run = DeepConfRun(call, params)
        async for _ in run.draw():
            pass
        run.fill_trace()
        return run.response()

    async def stream(self, call: PolicyCall, params: DeepConfParams) -> AsyncGenerator[dict[str, Any], None]:
        run = DeepConfRun(call, params)
        async for progress in run.draw():
            if params.progress:
                yield run.shapes.chunk([], refine_progress=progress)
        # The trace is complete before the finishing chunk, which is where refine attaches it.
        run.fill_trace()
        if params.progress:
            yield run.shapes.chunk([], refine_progress={**run.progress("decided"), "chosen": run.chosen.index})
        for chunk in run.answer_chunks():
            yield chunk
