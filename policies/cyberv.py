"""CyberV for text: a sensor / controller loop that spends a second round only where the first one is unsure.

Method: "CyberV: Cybernetics for Test-time Scaling in Video Understanding" (arXiv 2506.07971); the controller
follows the official code (github.com/marinero4972/CyberV, utils.py `select_output`). The paper reads video
attention; here the sensor reads token-level uncertainty from the engine's top logprobs.

**Round 1.** Every engine call is in flight at once, so vLLM batches them and shares the prompt's prefix:
- candidate 0, the direct answer: greedy, prompt `prompts/cyberv_direct.txt`;
- candidates 1..n-1: ONE call with `n = n - 1` samples of `prompts/cyberv_reason.txt` (think step by step)
  at the official sampling (temperature 1.0, top_p 0.5, top_k 5);
- the official greedy final-answer step, for every candidate as soon as it is written: the assistant message
  "candidate text + `prompts/cyberv_final.txt` ("Therefore, the final answer is")" is continued for a few
  tokens (vLLM's `continue_final_message`). What it says is the candidate's answer; when it says nothing
  extractable, the candidate's own text is read instead (`answers.extract_answer`).

**Sensor**, per candidate i. p_i is the probability of the first token of i's answer where that answer was
read (the final step, else the candidate text at the answer's last occurrence); 0 when unknown.
- s1 = p_i.
- s2 = 0 if (p_i - p_0) / p_0 < -0.5, else 1: confidence dropped against the direct answer's. 1 when p_0 = 0
  (no reference to drop from).
- s3 = 0 if some 15-29 character substring occurs at least 5 times (not overlapping) in the candidate's
  text, else 1: the candidate is looping.
- s4, token uncertainty in place of attention drift: the mean top-2 margin (p_top1 - p_top2) over the tokens
  of i's answer, against the direct answer's: 0 if i's is below half the direct answer's, else 1. It is 1 for
  the direct answer itself and when the direct answer's margin is unknown; 0 when only i's is unknown (the
  official code gives 0 to a candidate whose signal is missing).
- s5 = rank of p_i among the n candidates / n: the highest p_i ranks n (s5 = 1), the lowest 1, ties in
  candidate order, as in the official code.
The sensor also finds each candidate's strongest uncertainty spike: its token of highest entropy over the
top-5 alternatives, renormalised. That is where the feedback round looks.

**Controller** (official): score_i = 0.2 * (s1 + ... + s5), summed per distinct answer (`answers.Answer`:
kind and normalised value). If the best sum exceeds n * theta, the best-scoring candidate of that answer is
returned. Otherwise the feedback round runs.

**Feedback round**: ~80 characters either side of the spike in the best round-1 candidate (the best-scoring
candidate of the best answer) are quoted back to the model with `prompts/cyberv_feedback.txt` (recheck that
step), near-greedy. Its answer (read from its text) is accepted only if it is one of the round-1 answers;
otherwise the best round-1 candidate is returned (the spec's rule).

Choices where the spec leaves room, made for production use:
- Candidates with no extractable answer never vote, but still take part in s5's ranking (with p = 0, as the
  official code's 1e-4 for a missing probability). When no candidate has an answer, the direct answer is
  returned and no feedback round runs: no feedback answer could be accepted.
- Repetition counts non-overlapping occurrences: counted overlapping (as the official code does), a mere run
  of 19 equal characters (a markdown rule) would already be "repetition". Only length 15 is checked: a longer
  substring that occurs 5 times implies its 15-character prefix does.
- The client's request: `model` and `seed` go into every engine call; `max_tokens` / `max_completion_tokens`
  caps every generation whose text may be returned (direct, reasoning, feedback); `n` must be 1 (one chosen
  answer); a completions prompt must be one string. A chat conversation must end with a user message (text
  only): that message is the question, and the messages before it (system prompt, history) are kept in every
  engine call. cyberv sets its own sampling for each call, so the client's sampling fields (temperature,
  top_p, stop, logprobs, tools, ...) are not used. Every engine call goes to the chat endpoint, so the model's
  chat template applies on both of refine's endpoints.
- The response is the chosen generation's full text with its finish reason, no logprobs, and usage summing
  every engine call. A streamed response arrives once the decision is made, in pieces of a few words; with
  `progress`, chunks with no choices and a `refine_progress` object come first (plain OpenAI parsers skip
  them), and `stream_options.include_usage` adds the usual final usage chunk.
- Metrics: `corrections` is 1 when a feedback round ran (accepted or not), else 0 (its mean is the trigger
  rate); `rounds` is 1 or 2; `extra_tokens` counts every completion token generated beyond the returned
  answer's; `correction_seconds` is the feedback round's time. Per-round usage is in the trace's `rounds`.
- Concurrent calls run in a task group: when one fails, its siblings are cancelled rather than left running
  in the engine.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from refine_server.policies.answer_shapes import AnswerShapes
from refine_server.policies.answers import Answer, AnswerKind, extract_answer, question_kind
from refine_server.policies.base import (
    CORRECTION_SECONDS,
    CORRECTIONS,
    EXTRA_TOKENS,
    ROUNDS,
    Policy,
    PolicyCall,
    PolicyLimits,
    PolicyParams,
    PolicyRequestError,
)
from refine_server.policies.engine_client import run_together
from refine_server.policies.cyberv_sensor import (
    Candidate,
    Decision,
    Feedback,
    Generation,
    decide,
    judge_feedback,
    quote_span,
    round4,
    sense,
)

if TYPE_CHECKING:
    from refine_server.policies.request import ClientRequest

TOP_LOGPROBS = 5  # alternatives per token the sensor reads
FINAL_STEP_TOKENS = 12  # the final-answer step only has to write the answer
WORDS_PER_CHUNK = 4  # streaming: words per content chunk


class CyberVParams(PolicyParams):
    """Defaults are the official VideoMMMU script's (n, theta) and sampling (top_p, top_k) values."""

    n: int = Field(8, ge=2, description="candidates in round 1: the direct answer and n-1 reasoning samples")
    theta: float = Field(0.3, ge=0, le=1, description="the best answer's summed score must exceed n * theta")
    reasoning_temperature: float = Field(1.0, ge=0, le=2, description="sampling temperature of the reasoning samples")
    reasoning_top_p: float = Field(0.5, gt=0, le=1, description="top_p of the reasoning samples")
    reasoning_top_k: int = Field(5, ge=-1, description="top_k of the reasoning samples (-1 or 0: no limit)")
    max_reasoning_tokens: int = Field(256, ge=1, description="tokens per round-1 candidate at most")
    feedback_temperature: float = Field(0.01, ge=0, le=2, description="temperature of the feedback round")
    max_feedback_tokens: int = Field(256, ge=1, description="tokens of the feedback round's answer at most")
    progress: bool = Field(False, description="streaming: send progress chunks (no choices) before the answer")


class CyberVLimits(PolicyLimits):
    n: int | None = 16
    max_reasoning_tokens: int | None = 2048
    max_feedback_tokens: int | None = 2048


@functools.cache
def _template(name: str) -> str:
    """A prompt from prompts/ (package data), read once; the file's final newline is not part of it."""
    return (files("refine_server.policies") / "prompts" / name).read_text(encoding="utf-8").removesuffix("\n")


def _prompt(name: str, **fields: str) -> str:
    return _template(name).format(**fields)


# ---- the client's request --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    """What cyberv answers, and what it keeps of the client's request."""

    history: list[dict[str, Any]]  # chat messages before the question
    text: str
    max_tokens: int | None
    kind_hint: AnswerKind | None

    def messages(self, content: str) -> list[dict[str, Any]]:
        """The conversation with `content` (a prompt built around the question) as its last user message."""
        return [*self.history, {"role": "user", "content": content}]

    def cap(self, tokens: int) -> int:
        """A generation budget, capped by the client's max_tokens: whatever cyberv returns respects it."""
        return min(tokens, self.max_tokens) if self.max_tokens else tokens


def read_question(request: ClientRequest) -> Question:
    """The question of a chat or completions request; a request cyberv cannot answer is a 400."""
    request.require_one_choice("cyberv", "returns one chosen answer")
    if request.endpoint == "chat":
        history, text = request.question("cyberv")
    else:
        if not isinstance(request.prompt, str):
            raise PolicyRequestError("policy cyberv needs the prompt as one string (not a list or token ids)",
                                     "prompt")
        history, text = [], request.prompt
    if not text.strip():
        raise PolicyRequestError("policy cyberv needs a question, and this one has no text",
                                 "messages" if request.endpoint == "chat" else "prompt")
    return Question(history=history, text=text, max_tokens=request.max_tokens, kind_hint=question_kind(text))


# ---- one request -----------------------------------------------------------------------------------------

class CyberVRun:
    """One request through the loop: round 1, the decision, maybe the feedback round, then the answer."""

    def __init__(self, call: PolicyCall, params: CyberVParams):
        self.call = call
        self.params = params
        self.question = read_question(call.request)
        self.engine = call.engine
        self.candidates: list[Candidate] = []
        self.decision: Decision | None = None
        self.feedback: Feedback | None = None
        self.shapes = AnswerShapes(call.request.endpoint, call.request.model)

    # -- round 1 --

    async def round1(self) -> Decision:
        direct, reasoning = await run_together(self._direct(), self._reasoning())
        self.candidates = [direct, *reasoning]
        sense(self.candidates)
        self.decision = decide(self.candidates, self.params.n * self.params.theta)
        return self.decision

    def _sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.question.cap(self.params.max_reasoning_tokens),
                "logprobs": True, "top_logprobs": TOP_LOGPROBS}

    async def _direct(self) -> Candidate:
        prompt = self.question.messages(_prompt("cyberv_direct.txt", question=self.question.text))
        result = await self.engine.chat("round1", prompt, temperature=0.0, **self._sampling())
        return await self._with_final_step(0, "direct", prompt, Generation.from_choice(result["choices"][0]))

    async def _reasoning(self) -> list[Candidate]:
        p = self.params
        prompt = self.question.messages(_prompt("cyberv_reason.txt", question=self.question.text))
        result = await self.engine.chat(
            "round1", prompt, n=p.n - 1, temperature=p.reasoning_temperature, top_p=p.reasoning_top_p,
            top_k=p.reasoning_top_k, **self._sampling(),
        )
        choices = sorted(result["choices"], key=lambda c: c.get("index", 0))
        return await run_together(*(
            self._with_final_step(i, "reasoning", prompt, Generation.from_choice(choice))
            for i, choice in enumerate(choices, start=1)
        ))

    async def _with_final_step(
        self, index: int, kind: Literal["direct", "reasoning"], prompt: list[dict[str, Any]], generation: Generation
    ) -> Candidate:
        """The official greedy final-answer step: let the model state the answer of what it wrote."""
        written = {"role": "assistant", "content": _prompt("cyberv_final.txt", candidate=generation.text)}
        result = await self.engine.chat(
            "round1", [*prompt, written], add_generation_prompt=False, continue_final_message=True,
            temperature=0.0, max_tokens=FINAL_STEP_TOKENS, logprobs=True, top_logprobs=TOP_LOGPROBS,
        )
        candidate = Candidate(index, kind, generation, Generation.from_choice(result["choices"][0]))
        candidate.read_answer(self.question.kind_hint)
        return candidate

    # -- feedback round --

    def feedback_span(self) -> str:
        return quote_span(self.decision.best)

    async def feedback_round(self) -> Feedback:
        started = time.perf_counter()
        span = self.feedback_span()
        prompt = self.question.messages(_prompt("cyberv_feedback.txt", question=self.question.text, span=span))
        result = await self.engine.chat(
            "feedback", prompt, temperature=self.params.feedback_temperature,
            max_tokens=self.question.cap(self.params.max_feedback_tokens),
        )
        generation = Generation.from_choice(result["choices"][0])
        answer = extract_answer(generation.text, self.question.kind_hint)
        accepted, reason = judge_feedback(answer, self.candidates)
        self.feedback = Feedback(self.decision.best.index, span, generation, answer, accepted, reason,
                                 time.perf_counter() - started)
        return self.feedback

    # -- the outcome --

    @property
    def chosen(self) -> Generation:
        if self.feedback and self.feedback.accepted:
            return self.feedback.generation
        return self.decision.best.generation

    @property
    def chosen_answer(self) -> Answer | None:
        if self.feedback and self.feedback.accepted:
            return self.feedback.answer
        return self.decision.best.answer

    def fill_trace(self) -> None:
        d = self.decision
        chosen_feedback = bool(self.feedback and self.feedback.accepted)
        self.call.trace.data = {
            "candidates": [c.trace() for c in self.candidates],
            "answers": [
                {"answer": t.answer.value, "kind": t.answer.kind, "score": round4(t.score),
                 "candidates": [c.index for c in t.candidates]}
                for t in d.tallies
            ],
            "threshold": round4(d.threshold),
            "decision": d.action,
            "reason": d.reason,
            "feedback": self.feedback.trace() if self.feedback else None,
            "chosen": {
                "source": "feedback" if chosen_feedback else "candidate",
                "candidate": None if chosen_feedback else d.best.index,
                "answer": self.chosen_answer.value if self.chosen_answer else None,
            },
            "rounds": {name: {"engine_calls": c.calls, "prompt_tokens": c.prompt_tokens,
                              "completion_tokens": c.completion_tokens,
                              "total_tokens": c.prompt_tokens + c.completion_tokens}
                       for name, c in self.engine.spend.by_purpose.items()},
        }
        trace = self.call.trace
        trace.record(CORRECTIONS, 1 if self.feedback else 0)
        trace.record(CORRECTION_SECONDS, self.feedback.seconds if self.feedback else 0.0)
        trace.record(ROUNDS, 2 if self.feedback else 1)
        # Round-1 candidates carry their logprobs, one per token; the feedback round is a single generation.
        returned = (self.engine.spend.by_purpose["feedback"].completion_tokens if chosen_feedback
                    else len(d.best.generation.tokens))
        trace.record(EXTRA_TOKENS, self.engine.spend.completion_tokens - returned)

    def response(self) -> dict[str, Any]:
        return self.shapes.response(self.chosen.text, self.chosen.finish_reason, self.engine.usage())

    # -- streaming --

    def progress(self, stage: str, **details: Any) -> dict[str, Any]:
        return self.shapes.chunk([], refine_progress={"stage": stage, **details})

    def answer_chunks(self) -> list[dict[str, Any]]:
        """The chosen text in pieces of a few words (the first with the role), then the finishing chunk."""
        chunks = [self.shapes.piece(piece, first=i == 0)
                  for i, piece in enumerate(split_for_streaming(self.chosen.text))]
        chunks.append(self.shapes.finish(self.chosen.finish_reason))
        if self.call.request.include_usage:
            chunks.append(self.shapes.chunk([], usage=self.engine.usage()))
        return chunks


def split_for_streaming(text: str) -> list[str]:
    """Pieces of WORDS_PER_CHUNK words that join back to exactly `text`."""
    return re.findall(rf"\s*(?:\S+\s*){{1,{WORDS_PER_CHUNK}}}", text) or [text]


class CyberVPolicy(Policy):
    name = "cyberv"
    Params = CyberVParams
    Limits = CyberVLimits
    metrics = (*Policy.metrics, CORRECTIONS, ROUNDS, EXTRA_TOKENS)

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        run = CyberVRun(call, params)
        if (await run.round1()).action == "feedback":
            await run.feedback_round()
        run.fill_trace()
        return run.response()

    async def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[dict[str, Any]]:
        run = CyberVRun(call, params)
        decision = await run.round1()
        if params.progress:
            yield run.progress(
                "round1_done", candidates=len(run.candidates), threshold=round4(decision.threshold),
                answers=[{"answer": t.answer.value, "score": round4(t.score)} for t in decision.tallies],
            )
        if decision.action == "feedback":
            if params.progress:
                yield run.progress("feedback_started", candidate=decision.best.index, span=run.feedback_span())
            await run.feedback_round()
        # The trace is complete before the finishing chunk, which is where refine attaches it.
        run.fill_trace()
        if params.progress:
            answer = run.chosen_answer
            yield run.progress(
                "decided", decision=decision.action, answer=answer.value if answer else None,
                feedback_accepted=run.feedback.accepted if run.feedback else None,
            )
        for chunk in run.answer_chunks():
            yield chunk
