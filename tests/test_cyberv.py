"""cyberv: answer extraction, the sensor and controller on hand-made candidates, the whole policy against a
scripted backend (no engine), and, marked `engine`, the loop on the real model."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import pytest
from openai import OpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from refine_server.errors import APIError
from refine_server.metrics import Metrics
from refine_server.policies import LimitExceeded, PolicyRegistry
from refine_server.policies.answers import Answer, extract_answer, parse_answer, question_kind
from refine_server.policies.base import (
    CORRECTION_SECONDS,
    CORRECTIONS,
    EXTRA_TOKENS,
    ROUNDS,
    PolicyCall,
    PolicyRequestError,
)
from refine_server.policies.cyberv import CyberVParams, CyberVPolicy, split_for_streaming
from refine_server.policies.cyberv_sensor import (
    Candidate,
    Generation,
    confidence_signal,
    decide,
    has_repetition,
    judge_feedback,
    quote_span,
    rank_ascending,
    sense,
)
from refine_server.streaming import ChunkRelay
from tests.conftest import MODEL, policy_call

FINAL_SUFFIX = "\nTherefore, the final answer is"


# ---- answers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "42", "42.0", "42.00", "The answer is 42.", "**42**", "$42", "42 apples", "Answer: 42", "**Answer:** 42",
    "The answer is $\\boxed{42}$.", "The final answer is: 42 apples", "We add them up and get 42",
    "The answer is 41. Wait, I made an error: the answer is 42.",
])
def test_spellings_of_42_are_all_the_number_42(text: str) -> None:
    assert extract_answer(text) == Answer("number", "42")


@pytest.mark.parametrize("text, value", [
    ("0.5", "0.5"), ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("The answer is 1,000.", "1000"),
    ("The answer is -3.", "-3"), ("The answer is -0.50", "-0.5"), ("The answer is 1/3", "1/3"),
    ("The answer is x = 7.", "7"), ("The answer is approximately 3.14 metres.", "3.14"),
    ("$\\boxed{\\frac{3}{4}}$", "0.75"), ("First 3, then 7, so 12 remain.", "12"),
])
def test_numbers_are_normalised_exactly(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("number", value)


@pytest.mark.parametrize("text", [
    "(B)", "B)", "Option B", "The answer is B", "The answer is (B).", "answer is B.", "The answer is **B**",
    "The answer is B because the others are wrong.", "The correct answer is Option B: 12 apples",
])
def test_option_letters(text: str) -> None:
    assert extract_answer(text) == Answer("choice", "B")


def test_a_bare_a_before_a_word_is_the_article_unless_the_question_has_options() -> None:
    assert extract_answer("The answer is A.") == Answer("choice", "A")
    assert extract_answer("The answer is A dog.") == Answer("text", "dog")
    assert extract_answer("The answer is A because it is", "choice") == Answer("choice", "A")


def test_a_multiple_choice_question_reads_the_last_option_mentioned() -> None:
    assert extract_answer("Not (A), it must be (C).", "choice") == Answer("choice", "C")
    assert question_kind("Which is larger?\n(A) 3\n(B) 5") == "choice"
    assert question_kind("Pick one:\nA. red\nB. blue") == "choice"
    assert question_kind("What is 2 + 2?") is None


@pytest.mark.parametrize("text, value", [
    ("The answer is Paris.", "paris"), ("the answer is: **paris**", "paris"),
    ("The answer is the Eiffel Tower!", "eiffel tower"), ("Answer: It's blue.", "its blue"),
])
def test_short_text_answers_are_lowercased_without_punctuation_or_articles(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("text", value)


@pytest.mark.parametrize("text", [
    "", "   ", "I don't know how to solve this.", "The answer is", "The answer is **.",
    "The answer is a long sentence that goes on and on without ever naming anything short.",
])
def test_no_answer_is_none(text: str) -> None:
    assert extract_answer(text) is None


def test_kinds_are_part_of_equality_and_offsets_are_not() -> None:
    assert Answer("number", "2") != Answer("text", "2")
    assert Answer("number", "2", 0, 1) == Answer("number", "2", 7, 8)
    answer = extract_answer("The total is 42 apples.")
    assert (answer.start, answer.end) == (13, 15)
    assert len({extract_answer("42"), extract_answer("42.0"), extract_answer("(B)")}) == 2


@pytest.mark.parametrize("text, expected", [
    (" 4.", Answer("number", "4")), (" $\\boxed{12}$.", Answer("number", "12")),
    (" (C) because", Answer("choice", "C")),
    (":\n\n**7** apples.", Answer("number", "7")), (" 4.\n\nThe answer is 5", Answer("number", "4")),
    (" Paris.", Answer("text", "paris")), ("", None),
])
def test_parse_answer_reads_the_continuation_of_the_final_step(text: str, expected: Answer | None) -> None:
    assert parse_answer(text) == expected


# ---- vLLM-shaped responses -------------------------------------------------------------------------------

SPIKE_WORD = "maybe"  # tokens containing it are written with low confidence: the uncertainty spike


def _split_tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


def _token(tok: str, prob: float) -> dict[str, Any]:
    alternative = math.log(max((1 - prob) * 0.8, 1e-9))
    return {"token": tok, "logprob": math.log(prob), "bytes": list(tok.encode()),
            "top_logprobs": [{"token": tok, "logprob": math.log(prob), "bytes": None},
                             {"token": "<alt>", "logprob": alternative, "bytes": None}]}


def _choice(text: str, index: int = 0, first_prob: float = 0.9) -> dict[str, Any]:
    content = []
    for i, tok in enumerate(_split_tokens(text)):
        prob = first_prob if i == 0 else 0.3 if SPIKE_WORD in tok else 0.9
        content.append(_token(tok, prob))
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
            "logprobs": {"content": content}}


def _response(choices: list[dict[str, Any]]) -> dict[str, Any]:
    completion = sum(len(c["logprobs"]["content"]) for c in choices)
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": MODEL, "choices": choices,
            "usage": {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion}}


def _gen(text: str, first_prob: float = 0.9) -> Generation:
    return Generation.from_choice(_choice(text, first_prob=first_prob))


class ScriptedBackend:
    """Answers cyberv's engine calls as vLLM's chat endpoint would, from a script; records every call.

    `finals` maps a candidate's text to its final-answer step: (continuation, probability of its first token).
    """

    def __init__(self, direct: str, reasoning: list[str], finals: dict[str, tuple[str, float]], feedback: str = ""):
        self.direct, self.reasoning, self.finals, self.feedback = direct, reasoning, finals, feedback
        self.calls: list[dict[str, Any]] = []

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        assert (path, endpoint) == ("/v1/chat/completions", "chat")
        self.calls.append(body)
        last = body["messages"][-1]["content"]
        if body.get("continue_final_message"):
            continuation, prob = self.finals[last.removesuffix(FINAL_SUFFIX)]
            return _response([_choice(continuation, first_prob=prob)])
        if "Recheck" in last:
            return _response([_choice(self.feedback)])
        if body.get("n", 1) > 1:
            return _response([_choice(t, i) for i, t in enumerate(self.reasoning[: body["n"]])])
        return _response([_choice(self.direct)])

    def kinds(self) -> list[str]:
        def kind(body: dict[str, Any]) -> str:
            if body.get("continue_final_message"):
                return "final"
            if "Recheck" in body["messages"][-1]["content"]:
                return "feedback"
            return "reasoning" if body.get("n", 1) > 1 else "direct"
        return [kind(b) for b in self.calls]


DIRECT = "The answer is 4."


def _unanimous(n: int = 8) -> ScriptedBackend:
    reasoning = [f"Two plus two makes four. Sample {i}. The answer is 4." for i in range(1, n)]
    finals = {text: (" 4.", 0.95) for text in [DIRECT, *reasoning]}
    return ScriptedBackend(DIRECT, reasoning, finals)


def _split(feedback: str) -> ScriptedBackend:
    """Eight candidates, four answers, every one unsure: no answer can pass the gate."""
    reasoning = [f"Counting {SPIKE_WORD} gives {k}. The answer is {k}." for k in (3, 5, 5, 6, 6, 7, 3)]
    finals = {text: (f" {text.split()[-1]}", 0.3) for text in reasoning}
    finals[DIRECT] = (" 4.", 0.3)
    return ScriptedBackend(DIRECT, reasoning, finals, feedback)


def _call(backend: ScriptedBackend, endpoint: str = "chat", **body: Any) -> PolicyCall:
    question = "What is 2 + 2?"
    base = {"model": MODEL, "messages": [{"role": "user", "content": question}]} if endpoint == "chat" \
        else {"model": MODEL, "prompt": question}
    return policy_call(endpoint, {**base, **body}, backend)


# ---- sensor and controller on hand-made candidates -------------------------------------------------------

def _candidate(index: int, text: str, final: str, p: float) -> Candidate:
    candidate = Candidate(index, "direct" if index == 0 else "reasoning", _gen(text), _gen(final, p))
    candidate.read_answer(None)
    return candidate


def test_unanimous_confident_candidates_are_accepted() -> None:
    candidates = [_candidate(i, f"Step {i}. The answer is 4.", " 4.", 0.95) for i in range(8)]
    sense(candidates)
    assert candidates[3].signals == pytest.approx({"s1": 0.95, "s2": 1, "s3": 1, "s4": 1, "s5": 4 / 8})
    assert candidates[3].score == pytest.approx(0.2 * (0.95 + 3 + 0.5))
    decision = decide(candidates, 8 * 0.3)
    assert decision.action == "accepted"
    assert [t.answer for t in decision.tallies] == [Answer("number", "4")]
    assert decision.best is candidates[7]  # ties in p are ranked in candidate order, so the last ranks highest


def test_split_answers_trigger_feedback() -> None:
    candidates = [_candidate(i, f"The answer is {i % 4}.", f" {i % 4}.", 0.4) for i in range(8)]
    sense(candidates)
    decision = decide(candidates, 8 * 0.3)
    assert decision.action == "feedback"
    assert len(decision.tallies) == 4 and all(t.score <= 2.4 for t in decision.tallies)
    assert "<= n*theta = 2.400" in decision.reason


def test_candidates_without_an_answer_do_not_vote() -> None:
    candidates = [_candidate(0, "The answer is 4.", " 4.", 0.9),
                  _candidate(1, "I cannot tell.", " something I really cannot put into a few short words here", 0.9)]
    sense(candidates)
    assert candidates[1].answer is None and candidates[1].trace()["reason"] == "no extractable answer"
    assert [c.index for c in decide(candidates, 0.0).tallies[0].candidates] == [0]


def test_no_answer_anywhere_returns_the_direct_answer() -> None:
    candidates = [_candidate(i, "Hmm.", " unclear, as the question does not say what it is asking", 0.9)
                  for i in range(3)]
    sense(candidates)
    decision = decide(candidates, 0.0)
    assert decision.action == "no_answer" and decision.best is candidates[0]


def test_answer_falls_back_to_the_candidate_text_at_its_last_occurrence() -> None:
    candidate = _candidate(1, "First 3, then the answer is 9.", " something long that is not an answer at all ok", 0.5)
    assert candidate.answer == Answer("number", "9") and candidate.answer_source == "candidate_text"
    assert candidate.answer_tokens[0].text == " 9."


def test_confidence_drop_signal() -> None:
    assert confidence_signal(0.4, 0.9) == 0.0  # (0.4 - 0.9) / 0.9 = -0.56
    assert confidence_signal(0.5, 0.9) == 1.0  # -0.44
    assert confidence_signal(0.1, 0.0) == 1.0  # no reference


def test_rank_signal_gives_the_most_probable_answer_rank_n() -> None:
    assert rank_ascending([0.5, 0.9, 0.5, 0.1]) == [2, 4, 3, 1]


def test_uncertainty_signal_compares_answer_margins_with_the_direct_answer() -> None:
    candidates = [_candidate(0, "The answer is 4.", " 4.", 0.9), _candidate(1, "The answer is 4.", " 4.", 0.45),
                  _candidate(2, "The answer is 4.", " 4.", 0.8)]
    sense(candidates)
    # margins: 0.9 - 0.08 = 0.82 for the direct answer; 0.45 - 0.44 = 0.01 and 0.8 - 0.16 = 0.64
    assert [c.signals["s4"] for c in candidates] == [1.0, 0.0, 1.0]


def test_repetition_signal() -> None:
    assert has_repetition("We add one more. " * 6)
    assert not has_repetition("We add one more. " * 4)
    assert not has_repetition("short " * 3)
    assert not has_repetition("=" * 40)  # counted without overlaps, a rule of 40 is one repeat of 15, not five
    assert not has_repetition("Two plus two is four, and four is the answer to what was asked here.")


def test_feedback_quotes_the_text_around_the_uncertainty_spike() -> None:
    text = "x" * 200 + f" {SPIKE_WORD} " + "y" * 200
    candidate = _candidate(1, text, " 4.", 0.9)
    sense([_candidate(0, DIRECT, " 4.", 0.9), candidate])
    assert candidate.spike.token == f" {SPIKE_WORD}"
    span = quote_span(candidate)
    assert span.startswith("...") and span.endswith("...") and SPIKE_WORD in span
    assert len(span) <= 2 * 80 + 6


def test_feedback_answer_must_be_among_round1_answers() -> None:
    candidates = [_candidate(i, f"The answer is {k}.", f" {k}.", 0.5) for i, k in enumerate((3, 5))]
    assert judge_feedback(Answer("number", "5"), candidates)[0]
    accepted, reason = judge_feedback(Answer("number", "9"), candidates)
    assert not accepted and "not among the round-1 answers (3, 5)" in reason
    assert judge_feedback(None, candidates) == (False, "no extractable answer: returning the best round-1 candidate")


def test_streaming_pieces_join_back_exactly() -> None:
    for text in ["", "one", "  lead and trail  ", "a b c d e f g h i\n\nj k"]:
        pieces = split_for_streaming(text)
        assert "".join(pieces) == text
        assert all(len(p.split()) <= 4 for p in pieces)


def test_params_and_limits() -> None:
    registry = PolicyRegistry([CyberVPolicy])
    _, params = registry.resolve("cyberv", {})
    assert params.model_dump() == {
        "n": 8, "theta": 0.3, "reasoning_temperature": 1.0, "reasoning_top_p": 0.5, "reasoning_top_k": 5,
        "max_reasoning_tokens": 256, "feedback_temperature": 0.01, "max_feedback_tokens": 256, "progress": False,
    }
    with pytest.raises(LimitExceeded):
        registry.resolve("cyberv", {"n": 17})
    with pytest.raises(LimitExceeded):
        registry.resolve("cyberv", {"max_feedback_tokens": 4096})
    with pytest.raises(ValueError):
        registry.resolve("cyberv", {"temperature": 0.5})  # a typo of reasoning_temperature is an error


# ---- the policy against a scripted backend ---------------------------------------------------------------

async def test_unanimous_request_is_answered_in_one_round() -> None:
    backend = _unanimous()
    call = _call(backend, seed=7, max_tokens=100)
    body = await CyberVPolicy().complete(call, CyberVParams())

    ChatCompletion.model_validate(body)
    trace = call.trace.data
    assert trace["decision"] == "accepted" and trace["feedback"] is None
    assert _reported(call) == {"corrections": 0, "correction_seconds": 0, "rounds": 1,
                               "extra_tokens": body["usage"]["completion_tokens"] - _chosen_tokens(backend, trace)}
    assert trace["answers"][0]["answer"] == "4" and trace["threshold"] == 2.4
    chosen = trace["candidates"][trace["chosen"]["candidate"]]
    assert body["choices"][0]["message"]["content"] == backend.reasoning[chosen["index"] - 1]
    assert body["model"] == MODEL and body["choices"][0]["finish_reason"] == "stop"
    assert _reported(call)["extra_tokens"] > 0

    # Round 1: the direct answer, ONE call for the 7 samples, a final-answer step per candidate.
    assert sorted(backend.kinds()) == ["direct"] + ["final"] * 8 + ["reasoning"]
    assert trace["rounds"] == {"round1": {"engine_calls": 10, "prompt_tokens": 100,
                                          "completion_tokens": body["usage"]["completion_tokens"],
                                          "total_tokens": body["usage"]["total_tokens"]}}
    assert body["usage"]["prompt_tokens"] == 100
    direct, reasoning = (next(b for b, k in zip(backend.calls, backend.kinds()) if k == kind)
                         for kind in ("direct", "reasoning"))
    assert direct["temperature"] == 0 and direct["logprobs"] and direct["top_logprobs"] == 5
    assert "Answer directly" in direct["messages"][-1]["content"]
    assert {k: reasoning[k] for k in ("n", "temperature", "top_p", "top_k", "top_logprobs", "max_tokens")} == \
        {"n": 7, "temperature": 1.0, "top_p": 0.5, "top_k": 5, "top_logprobs": 5, "max_tokens": 100}
    assert "step by step" in reasoning["messages"][-1]["content"]
    final = next(b for b, k in zip(backend.calls, backend.kinds()) if k == "final")
    assert final["add_generation_prompt"] is False and final["continue_final_message"] is True
    assert final["temperature"] == 0 and final["messages"][-1]["role"] == "assistant"
    assert all(b["seed"] == 7 and b["model"] == MODEL for b in backend.calls)


async def test_split_request_gets_a_feedback_round_whose_known_answer_is_accepted() -> None:
    backend = _split("Rechecking the count, it is 5. The answer is 5.")
    call = _call(backend)
    body = await CyberVPolicy().complete(call, CyberVParams())

    trace = call.trace.data
    assert trace["decision"] == "feedback"
    assert trace["feedback"]["accepted"] is True and trace["feedback"]["answer"] == "5"
    assert SPIKE_WORD in trace["feedback"]["span"]
    assert trace["chosen"] == {"source": "feedback", "candidate": None, "answer": "5"}
    assert body["choices"][0]["message"]["content"] == backend.feedback
    reported = _reported(call)
    assert reported["corrections"] == 1 and reported["correction_seconds"] > 0 and reported["rounds"] == 2
    assert reported["extra_tokens"] == trace["rounds"]["round1"]["completion_tokens"]
    assert trace["rounds"]["feedback"]["engine_calls"] == 1
    assert body["usage"]["total_tokens"] == sum(r["total_tokens"] for r in trace["rounds"].values())
    feedback_call = backend.calls[-1]
    assert feedback_call["temperature"] == 0.01 and feedback_call["max_tokens"] == 256
    assert trace["feedback"]["span"].strip(".") in feedback_call["messages"][-1]["content"]


async def test_feedback_answer_not_among_round1_answers_is_rejected() -> None:
    backend = _split("After rechecking, the answer is 99.")
    call = _call(backend)
    body = await CyberVPolicy().complete(call, CyberVParams())

    trace = call.trace.data
    assert trace["feedback"]["accepted"] is False and "not among the round-1 answers" in trace["feedback"]["reason"]
    best = trace["chosen"]["candidate"]
    assert trace["chosen"]["source"] == "candidate" and trace["chosen"]["answer"] == trace["answers"][0]["answer"]
    assert body["choices"][0]["message"]["content"] == backend.reasoning[best - 1]
    assert _reported(call)["corrections"] == 1


async def test_no_extractable_answer_returns_the_direct_answer_without_feedback() -> None:
    vague = " no idea, since the question could mean many different things really"
    backend = ScriptedBackend("Hmm.", ["Let me think."] * 3, {"Hmm.": (vague, 0.5), "Let me think.": (vague, 0.5)})
    call = _call(backend)
    body = await CyberVPolicy().complete(call, CyberVParams(n=4))

    assert call.trace.data["decision"] == "no_answer" and "feedback" not in backend.kinds()
    assert all(c["answer"] is None for c in call.trace.data["candidates"])
    assert body["choices"][0]["message"]["content"] == "Hmm."


async def test_completions_endpoint_uses_the_chat_backend_and_answers_as_a_completion() -> None:
    backend = _unanimous(n=3)
    call = _call(backend, endpoint="completions")
    body = await CyberVPolicy().complete(call, CyberVParams(n=3))

    Completion.model_validate(body)
    assert body["object"] == "text_completion" and body["choices"][0]["text"].endswith("The answer is 4.")
    assert all(b["messages"][0]["role"] == "user" and "What is 2 + 2?" in b["messages"][0]["content"]
               for b in backend.calls)


async def test_chat_history_is_kept_and_the_last_user_message_is_the_question() -> None:
    backend = _unanimous(n=2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]
    call = policy_call("chat", {"model": MODEL, "messages": messages}, backend)
    await CyberVPolicy().complete(call, CyberVParams(n=2))
    for body in backend.calls:
        assert body["messages"][:3] == messages[:3]
        assert "What is 2 + 2?" in body["messages"][3]["content"]


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat", {"n": 2}, "n"),
    ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("completions", {"prompt": "  "}, "prompt"),
    ("chat", {"messages": [{"role": "user", "content": ""}]}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages"),
])
async def test_requests_cyberv_cannot_answer_are_400(endpoint: str, body: dict[str, Any], param: str) -> None:
    backend = _unanimous()
    call = _call(backend, endpoint=endpoint, **body)
    with pytest.raises(PolicyRequestError) as err:
        await CyberVPolicy().complete(call, CyberVParams())
    assert (err.value.status, err.value.param) == (400, param)
    with pytest.raises(PolicyRequestError):
        await anext(CyberVPolicy().stream(call, CyberVParams()))
    assert backend.calls == []


def _reported(call: PolicyCall) -> dict[str, float]:
    """The metric values cyberv reported for one request, by short name."""
    names = {CORRECTIONS: "corrections", CORRECTION_SECONDS: "correction_seconds", ROUNDS: "rounds",
             EXTRA_TOKENS: "extra_tokens"}
    return {short: call.trace.values[m.name] for m, short in names.items() if m.name in call.trace.values}


def _chosen_tokens(backend: ScriptedBackend, trace: dict[str, Any]) -> int:
    chosen = trace["candidates"][trace["chosen"]["candidate"]]
    return len(backend.reasoning[chosen["index"] - 1].split())  # the scripted backend: a token per word


async def _relay(call: PolicyCall, params: CyberVParams) -> list[dict[str, Any]]:
    """The policy's stream as refine serves it (ChunkRelay attaches the refine block), parsed back from SSE."""
    chunks = CyberVPolicy().stream(call, params)
    relay = ChunkRelay(
        await anext(chunks), chunks, n_choices=1, metrics=Metrics({"cyberv": CyberVPolicy.metrics}), policy_label="cyberv",
        refine_block=lambda: {"policy": "cyberv", "trace": call.trace.data},
        started=time.perf_counter(), on_finish=lambda status: None,
    )
    events = [line.removeprefix("data: ").strip() async for line in relay]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_stream_with_progress_sends_progress_then_the_answer_then_the_refine_block() -> None:
    backend = _split("Rechecking the count, it is 5. The answer is 5.")
    events = await _relay(_call(backend, stream=True), CyberVParams(progress=True))

    parsed = [ChatCompletionChunk.model_validate(e) for e in events]  # what the openai client does with each
    stages = [e["refine_progress"]["stage"] for e in events if "refine_progress" in e]
    assert stages == ["round1_done", "feedback_started", "decided"]
    assert all(not e["choices"] for e in events[:3])
    assert events[0]["refine_progress"]["threshold"] == 2.4 and len(events[0]["refine_progress"]["answers"]) == 5
    assert events[2]["refine_progress"] == {"stage": "decided", "decision": "feedback", "answer": "5",
                                            "feedback_accepted": True}
    answer = parsed[3:]
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == backend.feedback
    assert len(answer) > 2  # streamed in pieces
    assert answer[-1].choices[0].finish_reason == "stop"
    assert [("refine" in e) for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["refine"]["trace"]["decision"] == "feedback"
    assert len({e["id"] for e in events}) == 1


async def test_stream_without_progress_is_plain_completion_chunks_with_usage_when_asked() -> None:
    backend = _unanimous(n=3)
    call = _call(backend, endpoint="completions", stream=True, stream_options={"include_usage": True})
    events = await _relay(call, CyberVParams(n=3))

    assert not any("refine_progress" in e for e in events)
    text_chunks, finishing, usage_chunk = events[:-2], Completion.model_validate(events[-2]), events[-1]
    # Like vLLM's, the pieces before the last have no finish_reason yet (the openai client does not validate them).
    assert all(e["object"] == "text_completion" and e["choices"][0]["finish_reason"] is None for e in text_chunks)
    assert "".join(e["choices"][0]["text"] for e in text_chunks).endswith("The answer is 4.")
    assert finishing.choices[0].finish_reason == "stop" and "refine" in events[-2]
    usage = Completion.model_validate(usage_chunk)
    assert usage.choices == [] and usage.usage.total_tokens == sum(
        r["total_tokens"] for r in call.trace.data["rounds"].values())


async def test_a_failing_engine_call_fails_the_request_with_its_error() -> None:
    class Failing(ScriptedBackend):
        async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
            if body.get("n", 1) > 1:
                raise APIError(400, "top_k must be -1, 0 or at least 1")
            return await super().post_json(path, body, endpoint=endpoint)

    backend = _unanimous()
    failing = Failing(backend.direct, backend.reasoning, backend.finals)
    with pytest.raises(APIError, match="top_k"):
        await CyberVPolicy().complete(_call(failing), CyberVParams())


# ---- on the real engine ----------------------------------------------------------------------------------

EASY = [{"role": "user", "content": "What is 2 + 2?"}]
# The official defaults (n=8, theta=0.3, T=1.0 / top_p 0.5 / top_k 5), a fixed seed and shorter generations.
DEFAULTS = {"policy": "cyberv", "max_reasoning_tokens": 96, "max_feedback_tokens": 128}


@pytest.mark.engine
def test_engine_unanimous_easy_question_is_accepted_without_feedback(client: OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=EASY, seed=0, extra_body={"refine": DEFAULTS})
    trace = resp.model_extra["refine"]["trace"]
    assert trace["decision"] == "accepted", trace
    assert trace["answers"][0]["answer"] == "4" and trace["answers"][0]["score"] > trace["threshold"] == 2.4
    assert trace["feedback"] is None and set(trace["rounds"]) == {"round1"}
    assert len(trace["candidates"]) == 8 and trace["rounds"]["round1"]["engine_calls"] == 10
    assert resp.usage.total_tokens == trace["rounds"]["round1"]["total_tokens"]


@pytest.mark.engine
def test_engine_completions_endpoint(client: OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="What is 2 + 2?", seed=0, extra_body={"refine": DEFAULTS})
    trace = resp.model_extra["refine"]["trace"]
    assert resp.object == "text_completion" and resp.choices[0].text.strip()
    assert trace["decision"] == "accepted" and trace["chosen"]["answer"] == "4", trace


@pytest.mark.engine
def test_engine_split_question_triggers_a_feedback_round(client: OpenAI) -> None:
    # A multi-step word problem is beyond a 135M model: its sampled candidates scatter over many answers, so no
    # answer's summed score reaches n * theta = 2.4 (each candidate scores at most 1).
    question = ("A shop sells pens at 7 for $3. Maria buys 45 pens, pays with a $50 note and then spends half "
                "of her change on pencils at 35 cents each. How many pencils does she buy?")
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], seed=0,
                                          extra_body={"refine": DEFAULTS})
    trace = resp.model_extra["refine"]["trace"]
    assert len(trace["answers"]) >= 3, trace["answers"]
    assert trace["decision"] == "feedback" and trace["answers"][0]["score"] <= trace["threshold"], trace
    feedback = trace["feedback"]
    assert feedback["span"] and trace["rounds"]["feedback"]["engine_calls"] == 1
    assert trace["chosen"]["source"] == ("feedback" if feedback["accepted"] else "candidate")
    if feedback["accepted"]:
        assert feedback["answer"] in {c["answer"] for c in trace["candidates"]}
    assert resp.usage.total_tokens == sum(r["total_tokens"] for r in trace["rounds"].values())


@pytest.mark.engine
def test_engine_stream_with_progress(client: OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=EASY, stream=True, seed=0,
                                            extra_body={"refine": {**DEFAULTS, "progress": True}})
    chunks = list(stream)
    progress = [c.model_extra["refine_progress"]["stage"] for c in chunks if c.model_extra.get("refine_progress")]
    first_answer = next(i for i, c in enumerate(chunks) if c.choices)
    assert progress[0] == "round1_done" and progress[-1] == "decided"
    assert all(not c.choices for c in chunks[:first_answer]) and len(progress) == first_answer
    assert chunks[first_answer].choices[0].delta.role == "assistant"
    blocks = [c.model_extra["refine"] for c in chunks if c.model_extra.get("refine")]
    assert len(blocks) == 1 and chunks[-1].model_extra.get("refine") and chunks[-1].choices[0].finish_reason
    trace = blocks[0]["trace"]
    assert ("feedback_started" in progress) == (trace["feedback"] is not None)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
