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
- The trace's `corrections` is 1 when a feedback round ran (accepted or not), else 0; `correction_seconds` is
  that round's time; the extra tokens it cost are in the trace's `rounds`.
- Concurrent calls run in a task group: when one fails, its siblings are cancelled rather than left running
  in the engine.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field

from refine_server.errors import invalid_request
from refine_server.policies.answers import Answer, AnswerKind, extract_answer, parse_answer, question_kind
from refine_server.policies.base import PATHS, Endpoint, Policy, PolicyCall, PolicyLimits, PolicyParams

if TYPE_CHECKING:
    from refine_server.backend import Backend

T = TypeVar("T")

TOP_LOGPROBS = 5  # alternatives per token the sensor reads
FINAL_STEP_TOKENS = 12  # the final-answer step only has to write the answer
SIGNAL_WEIGHT = 0.2  # official: every beta_i is 0.2
CONFIDENCE_DROP = -0.5  # s2: relative drop of p_i against p_0 that zeroes the signal
REPEAT_LENGTH, REPEAT_TIMES = 15, 5  # s3: official substring length (15-29) and count
MARGIN_RATIO = 0.5  # s4: an answer margin below this fraction of the direct answer's zeroes the signal
SPAN_CHARS = 80  # feedback: characters quoted on either side of the uncertainty spike
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

    endpoint: Endpoint
    model: str
    history: list[dict[str, Any]]  # chat messages before the question
    text: str
    seed: int | None
    max_tokens: int | None
    include_usage: bool
    kind_hint: AnswerKind | None

    def messages(self, content: str) -> list[dict[str, Any]]:
        """The conversation with `content` (a prompt built around the question) as its last user message."""
        return [*self.history, {"role": "user", "content": content}]

    def cap(self, tokens: int) -> int:
        """A generation budget, capped by the client's max_tokens: whatever cyberv returns respects it."""
        return min(tokens, self.max_tokens) if self.max_tokens else tokens


def read_question(call: PolicyCall) -> Question:
    """The question of a chat or completions request; a request cyberv cannot answer is a 400."""
    body = call.body
    if (body.get("n") or 1) != 1:
        raise invalid_request("policy cyberv returns one chosen answer: n must be 1", "n")
    param = "messages" if call.endpoint == "chat" else "prompt"
    if call.endpoint == "chat":
        history, text = _chat_question(body["messages"])
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid_request("policy cyberv needs the prompt as one string (not a list or token ids)", "prompt")
        history, text = [], prompt
    if not text.strip():
        raise invalid_request("policy cyberv needs a question, and this one has no text", param)
    return Question(
        endpoint=call.endpoint,
        model=body["model"],
        history=history,
        text=text,
        seed=body.get("seed"),
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        kind_hint=question_kind(text),
    )


def _chat_question(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    last = messages[-1]
    if last.get("role") != "user":
        raise invalid_request("policy cyberv answers the last message, which must come from the user", "messages")
    content = last.get("content")
    if isinstance(content, list):
        if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
            raise invalid_request("policy cyberv reads text only: the last message has non-text parts", "messages")
        content = "\n".join(str(part.get("text", "")) for part in content)
    if not isinstance(content, str):
        raise invalid_request("the last user message has no text to answer", "messages")
    return messages[:-1], content


# ---- what the engine wrote -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    text: str
    logprob: float
    top: tuple[float, ...]  # logprobs of the top alternatives, best first
    nbytes: int  # UTF-8 length: maps tokens to text offsets even where a token ends inside a character

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    @property
    def entropy(self) -> float:
        """Entropy (nats) of the top alternatives, renormalised: all the API shows of the distribution."""
        probs = [math.exp(lp) for lp in self.top]
        total = sum(probs)
        return -sum(p / total * math.log(p / total) for p in probs if p > 0) if total > 0 else 0.0

    @property
    def margin(self) -> float:
        """p(top 1) - p(top 2): small where the model hesitated between two tokens."""
        probs = [math.exp(lp) for lp in self.top[:2]]
        return probs[0] - (probs[1] if len(probs) > 1 else 0.0)


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[Token]
    finish_reason: str | None

    @classmethod
    def from_choice(cls, choice: dict[str, Any]) -> Generation:
        """A vLLM chat choice, its logprobs (`top_logprobs` asked for) included when present."""
        tokens = []
        for item in (choice.get("logprobs") or {}).get("content") or ():
            raw = item.get("bytes")
            top = sorted((alt["logprob"] for alt in item.get("top_logprobs") or ()), reverse=True)
            tokens.append(Token(item["token"], item["logprob"], tuple(top) or (item["logprob"],),
                                len(raw) if raw is not None else len(item["token"].encode())))
        return cls((choice.get("message") or {}).get("content") or "", tokens, choice.get("finish_reason"))

    def tokens_between(self, start: int, end: int) -> list[Token]:
        """The tokens that wrote text[start:end] (character offsets; an empty span: the token at `start`)."""
        first, last = len(self.text[:start].encode()), len(self.text[:end].encode())
        last = max(last, first + 1)
        found, pos = [], 0
        for token in self.tokens:
            if pos < last and pos + token.nbytes > first:
                found.append(token)
            pos += token.nbytes
        return found

    def offset_of(self, index: int) -> int:
        """Character offset in the text where token `index` begins."""
        nbytes = sum(t.nbytes for t in self.tokens[:index])
        return len(self.text.encode()[:nbytes].decode(errors="ignore"))


@dataclass(frozen=True)
class Spike:
    """A candidate's most uncertain token: where the feedback round asks the model to look again."""

    offset: int
    token: str
    entropy: float

    def trace(self) -> dict[str, Any]:
        return {"offset": self.offset, "token": self.token, "entropy": _round(self.entropy)}


def find_spike(generation: Generation) -> Spike | None:
    """The token of highest entropy, where the text is; None without logprobs."""
    if not generation.tokens:
        return None
    index = max(range(len(generation.tokens)), key=lambda i: generation.tokens[i].entropy)
    token = generation.tokens[index]
    return Spike(generation.offset_of(index), token.text, token.entropy)


# ---- candidates and the sensor ---------------------------------------------------------------------------

@dataclass
class Candidate:
    index: int
    kind: Literal["direct", "reasoning"]
    generation: Generation
    final: Generation  # the greedy final-answer step's continuation
    answer: Answer | None = None
    answer_source: Literal["final_step", "candidate_text"] | None = None
    answer_tokens: list[Token] = field(default_factory=list)
    spike: Spike | None = None
    signals: dict[str, float] = field(default_factory=dict)
    score: float = 0.0

    def read_answer(self, kind_hint: AnswerKind | None) -> None:
        """The final step's answer, else the candidate text's; and the tokens that wrote it."""
        for source, generation, read in (("final_step", self.final, parse_answer),
                                         ("candidate_text", self.generation, extract_answer)):
            answer = read(generation.text, kind_hint)
            if answer is not None:
                self.answer, self.answer_source = answer, source
                self.answer_tokens = generation.tokens_between(answer.start, answer.end)
                return

    @property
    def p(self) -> float | None:
        """Probability of the answer's first token; None when the answer or its logprobs are missing."""
        return self.answer_tokens[0].prob if self.answer_tokens else None

    @property
    def answer_margin(self) -> float | None:
        """Mean top-2 margin over the tokens of the answer (s4); None when they are unknown."""
        if not self.answer_tokens:
            return None
        return sum(t.margin for t in self.answer_tokens) / len(self.answer_tokens)

    def trace(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "index": self.index,
            "kind": self.kind,
            "answer": self.answer.value if self.answer else None,
            "answer_kind": self.answer.kind if self.answer else None,
            "answer_source": self.answer_source,
            "signals": {name: _round(value) for name, value in self.signals.items()},
            "score": _round(self.score),
            "answer_margin": _round(self.answer_margin),
            "spike": self.spike.trace() if self.spike else None,
            "finish_reason": self.generation.finish_reason,
        }
        if self.answer is None:
            entry["reason"] = "no extractable answer"
        return entry


def sense(candidates: list[Candidate]) -> None:
    """Fill every candidate's signals s1..s5, score and uncertainty spike. Candidate 0 is the direct answer."""
    direct = candidates[0]
    probs = [c.p or 0.0 for c in candidates]
    ranks = rank_ascending(probs)
    for c, p, rank in zip(candidates, probs, ranks):
        c.signals = {
            "s1": p,
            "s2": confidence_signal(p, probs[0]),
            "s3": 0.0 if has_repetition(c.generation.text) else 1.0,
            "s4": uncertainty_signal(c, direct),
            "s5": rank / len(candidates),
        }
        c.score = SIGNAL_WEIGHT * sum(c.signals.values())
        c.spike = find_spike(c.generation)


def confidence_signal(p: float, p_direct: float) -> float:
    """s2: 0 when p dropped by more than half against the direct answer's probability."""
    if p_direct <= 0:
        return 1.0
    return 0.0 if (p - p_direct) / p_direct < CONFIDENCE_DROP else 1.0


def has_repetition(text: str) -> bool:
    """s3's test: a 15-29 character substring occurs REPEAT_TIMES times or more, not overlapping.

    Checking length 15 is enough: where a longer substring occurs 5 times without overlap, so does its
    15-character prefix.
    """
    if len(text) <= 2 * REPEAT_LENGTH:  # the official code's floor
        return False
    windows = Counter(text[i:i + REPEAT_LENGTH] for i in range(len(text) - REPEAT_LENGTH + 1))
    return any(count >= REPEAT_TIMES and text.count(sub) >= REPEAT_TIMES for sub, count in windows.items())


def uncertainty_signal(candidate: Candidate, direct: Candidate) -> float:
    """s4: 0 when the candidate's answer was written much less decisively than the direct answer."""
    reference = direct.answer_margin
    if candidate is direct or reference is None:
        return 1.0
    own = candidate.answer_margin
    if own is None:
        return 0.0
    return 0.0 if own < MARGIN_RATIO * reference else 1.0


def rank_ascending(values: list[float]) -> list[int]:
    """1 for the smallest value ... len for the largest; ties ranked in list order (the official sort)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return ranks


# ---- the controller --------------------------------------------------------------------------------------

@dataclass
class Tally:
    answer: Answer
    score: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class Decision:
    action: Literal["accepted", "feedback", "no_answer"]
    best: Candidate  # round 1's choice: the best-scoring candidate of the best answer, else the direct answer
    tallies: list[Tally]  # best first
    threshold: float
    reason: str


def decide(candidates: list[Candidate], threshold: float) -> Decision:
    """The official gate: accept the best answer if its summed score exceeds the threshold (n * theta)."""
    tallies = tally(candidates)
    if not tallies:
        return Decision("no_answer", candidates[0], [], threshold,
                        "no candidate has an extractable answer: returning the direct answer")
    top = tallies[0]
    best = max(top.candidates, key=lambda c: c.score)
    if top.score > threshold:
        return Decision("accepted", best, tallies, threshold,
                        f"answer {top.answer} scored {top.score:.3f} > n*theta = {threshold:.3f}")
    return Decision("feedback", best, tallies, threshold,
                    f"best answer {top.answer} scored {top.score:.3f} <= n*theta = {threshold:.3f}")


def tally(candidates: list[Candidate]) -> list[Tally]:
    """Scores summed per answer, best first; on a tie the answer seen first wins, as in the official code."""
    by_answer: dict[Answer, Tally] = {}
    for c in candidates:
        if c.answer is not None:
            entry = by_answer.setdefault(c.answer, Tally(c.answer))
            entry.score += c.score
            entry.candidates.append(c)
    return sorted(by_answer.values(), key=lambda t: -t.score)


def quote_span(candidate: Candidate) -> str:
    """The text around the candidate's uncertainty spike (its end when it has no logprobs)."""
    text = candidate.generation.text
    centre = candidate.spike.offset if candidate.spike else len(text)
    start, end = max(0, centre - SPAN_CHARS), min(len(text), centre + SPAN_CHARS)
    return ("..." if start > 0 else "") + text[start:end].strip() + ("..." if end < len(text) else "")


# ---- the feedback round ----------------------------------------------------------------------------------

@dataclass
class Feedback:
    candidate: int
    span: str
    generation: Generation
    answer: Answer | None
    accepted: bool
    reason: str
    seconds: float

    def trace(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "span": self.span,
            "answer": self.answer.value if self.answer else None,
            "accepted": self.accepted,
            "reason": self.reason,
            "seconds": _round(self.seconds),
        }


def judge_feedback(answer: Answer | None, candidates: list[Candidate]) -> tuple[bool, str]:
    """The spec's rule: a feedback answer counts only if round 1 produced it too."""
    if answer is None:
        return False, "no extractable answer: returning the best round-1 candidate"
    known = [c.answer for c in candidates if c.answer is not None]
    if answer in known:
        return True, f"answer {answer} is among the round-1 answers"
    listed = ", ".join(dict.fromkeys(a.value for a in known))
    return False, f"answer {answer} is not among the round-1 answers ({listed}): returning the best round-1 candidate"


# ---- engine calls ----------------------------------------------------------------------------------------

@dataclass
class Usage:
    engine_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage: dict[str, Any] | None) -> None:
        self.engine_calls += 1
        self.prompt_tokens += (usage or {}).get("prompt_tokens") or 0
        self.completion_tokens += (usage or {}).get("completion_tokens") or 0

    def as_dict(self) -> dict[str, int]:
        return {"engine_calls": self.engine_calls, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Engine:
    """The backend's chat endpoint with the client's model and seed, counting what each round spends."""

    def __init__(self, backend: Backend, question: Question):
        self._backend = backend
        self._question = question
        self.rounds: dict[str, Usage] = {}

    async def chat(self, round_name: str, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        body = {"model": self._question.model, "messages": messages, **fields}
        if self._question.seed is not None:
            body["seed"] = self._question.seed
        result = await self._backend.post_json(PATHS["chat"], body, endpoint="chat")
        self.rounds.setdefault(round_name, Usage()).add(result.get("usage"))
        return result

    def total(self) -> dict[str, int]:
        """The OpenAI usage of the whole request: every engine call of every round."""
        prompt = sum(u.prompt_tokens for u in self.rounds.values())
        completion = sum(u.completion_tokens for u in self.rounds.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def run_together(*work: Awaitable[T]) -> list[T]:
    """Run concurrently; the first failure cancels the rest and is raised as itself (not as a group)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(w) for w in work]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [t.result() for t in tasks]


# ---- one request -----------------------------------------------------------------------------------------

class CyberVRun:
    """One request through the loop: round 1, the decision, maybe the feedback round, then the answer."""

    def __init__(self, call: PolicyCall, params: CyberVParams):
        self.call = call
        self.params = params
        self.question = read_question(call)
        self.engine = Engine(call.backend, self.question)
        self.candidates: list[Candidate] = []
        self.decision: Decision | None = None
        self.feedback: Feedback | None = None
        self.id = ("chatcmpl-" if self.question.endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

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
                {"answer": t.answer.value, "kind": t.answer.kind, "score": _round(t.score),
                 "candidates": [c.index for c in t.candidates]}
                for t in d.tallies
            ],
            "threshold": _round(d.threshold),
            "decision": d.action,
            "reason": d.reason,
            "feedback": self.feedback.trace() if self.feedback else None,
            "chosen": {
                "source": "feedback" if chosen_feedback else "candidate",
                "candidate": None if chosen_feedback else d.best.index,
                "answer": self.chosen_answer.value if self.chosen_answer else None,
            },
            "rounds": {name: usage.as_dict() for name, usage in self.engine.rounds.items()},
        }
        self.call.trace.corrections = 1 if self.feedback else 0
        self.call.trace.correction_seconds = self.feedback.seconds if self.feedback else 0.0

    def response(self) -> dict[str, Any]:
        chosen = self.chosen
        if self.question.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": chosen.text},
                      "finish_reason": chosen.finish_reason, "logprobs": None}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": chosen.text, "finish_reason": chosen.finish_reason, "logprobs": None}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.question.model,
                "choices": [choice], "usage": self.engine.total()}

    # -- streaming --

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.question.endpoint == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.question.model,
                "choices": choices, **extra}

    def progress(self, stage: str, **details: Any) -> dict[str, Any]:
        return self.chunk([], refine_progress={"stage": stage, **details})

    def answer_chunks(self) -> list[dict[str, Any]]:
        """The chosen text in pieces of a few words (the first with the role), then the finishing chunk."""
        chat = self.question.endpoint == "chat"
        chunks = []
        for i, piece in enumerate(split_for_streaming(self.chosen.text)):
            if chat:
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                chunks.append(self.chunk([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]))
            else:
                chunks.append(self.chunk([{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]))
        last = {"delta": {}} if chat else {"text": ""}
        chunks.append(self.chunk([{"index": 0, **last, "finish_reason": self.chosen.finish_reason, "logprobs": None}]))
        if self.question.include_usage:
            chunks.append(self.chunk([], usage=self.engine.total()))
        return chunks


def split_for_streaming(text: str) -> list[str]:
    """Pieces of WORDS_PER_CHUNK words that join back to exactly `text`."""
    return re.findall(rf"\s*(?:\S+\s*){{1,{WORDS_PER_CHUNK}}}", text) or [text]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class CyberVPolicy(Policy):
    name = "cyberv"
    Params = CyberVParams
    Limits = CyberVLimits

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
                "round1_done", candidates=len(run.candidates), threshold=_round(decision.threshold),
                answers=[{"answer": t.answer.value, "score": _round(t.score)} for t in decision.tallies],
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
