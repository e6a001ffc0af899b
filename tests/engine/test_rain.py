"""rain on the real model through the official openai client. tests/unit/policies/ has the tree's rules and the
search against a scripted engine."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from openai import OpenAI

from refine_server.policies.rain.search import ANSWER_LINE
from tests.conftest import MODEL, SECOND_MODEL_NAME, metric_total


def _rain(**params: Any) -> dict[str, Any]:
    return {"refine": {"policy": "rain", **params}}


@pytest.mark.engine
def test_self_evaluation_rejects_the_greedy_token_and_the_search_commits_another(client: OpenAI) -> None:
    """The bundled 135M model judges mostly by option position, so its values are nearly always 0 (see the
    README); this question and criterion were found by probing for a case where it rejects the greedy first
    token ("The": not a name) and not others. With max_tokens=1 every child is a final answer, evaluated
    without a rollout, so nothing in the case is sampled. If the model's judgement moves, the first assertion
    fails and prints every child's values: re-probe, don't loosen it."""
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    resp = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=1,
        extra_body=_rain(criterion="custom", question="Is the first word of the reply a name?"),
    )
    trace = resp.model_extra["refine"]["trace"]
    (commit,) = trace["commits"]
    greedy = next(c for c in commit["children"] if c["greedy"])
    committed = next(c for c in commit["children"] if c["tokens"] == commit["tokens"])
    assert greedy["q"] == -1.0 and greedy["true_visits"] >= 1, ("probed case moved", commit["children"])
    if max(c["q"] for c in commit["children"]) == -1.0:
        # Seen once in CI: the batched bf16 judge, with other prefixes cached, rejected every child; then there is
        # no better token to commit, and the case tests nothing. Re-probe for a case that does not flip.
        pytest.skip(f"the judge rejected every child this run: {commit['children']}")
    assert committed["q"] > greedy["q"] and not commit["greedy"]
    assert commit["rewinds"] > 0
    assert resp.choices[0].message.content != plain.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"


@pytest.mark.engine
def test_the_judge_guard_commits_at_once_when_the_model_answers_by_position(client: OpenAI) -> None:
    """The bundled model prefers option "(B)" in both orders for this conversation (see the README), so each value
    is 0: the guard commits after the first 4 evaluations of the first commit, after the first of the next (the
    request's judge has answered by position 4 times already), and the trace says why. Paper-exact (judge_guard
    false), the same commit runs all its iterations.

    Probed on the bundled model (no request field can force the judge's letters): if its behaviour moves, the
    first assertion fails and prints the judge's counts. Re-probe, don't loosen it."""
    messages = [{"role": "user", "content": "How do I make my coffee less bitter?"}]
    resp = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        seed=0,
        extra_body=_rain(max_iterations_per_commit=12, min_iterations_per_commit=12),
    )
    trace = resp.model_extra["refine"]["trace"]
    assert [c["stopped"] for c in trace["commits"]] == ["no_signal", "no_signal"], trace["judge"]  # 1 and 2 tokens
    for commit, evaluations in zip(trace["commits"], (4, 1), strict=True):
        assert commit["iterations"] == evaluations
        assert commit["judge"]["values"] == {"-1": 0, "0": evaluations, "1": 0}
        assert commit["judge"]["orders_agree"] == 0 and commit["judge"]["same_letter_both_orders"]["B"] > 0
        assert commit["tokens"] == max(commit["children"], key=lambda c: (c["visits"], c["q"]))["tokens"]
    judge = trace["judge"]
    assert judge["model"] == MODEL and judge["guard"] and judge["no_signal_commits"] == 2
    assert judge["evaluations"] == 5 and judge["values"]["0"] == 5
    assert trace["tokenizer"] == "local" and trace["tokenizer_calls"] <= 1  # only the chat template's

    exact = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=1,
        seed=0,
        extra_body=_rain(judge_guard=False, max_iterations_per_commit=12, min_iterations_per_commit=12),
    )
    (commit,) = exact.model_extra["refine"]["trace"]["commits"]
    assert commit["stopped"] == "iterations" and commit["iterations"] == 12
    assert exact.model_extra["refine"]["trace"]["judge"]["guard"] is False


@pytest.mark.engine
def test_a_separate_judge_model_answers_the_self_evaluation(client: OpenAI) -> None:
    """The test engine serves its model under a second name: the evaluation calls go to that name (vLLM refuses
    an unknown model, so the answer proves the wiring), and an unserved judge is a 400 naming the parameter."""
    import openai

    resp = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=2,
        seed=0,
        extra_body=_rain(judge_model=SECOND_MODEL_NAME, max_iterations_per_commit=3, min_iterations_per_commit=3),
    )
    trace = resp.model_extra["refine"]["trace"]
    assert trace["judge"]["model"] == SECOND_MODEL_NAME and trace["judge"]["evaluations"] > 0
    assert trace["engine"]["evaluate"]["calls"] > 0 and resp.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body=_rain(judge_model="no-such-model"))
    assert err.value.body["param"] == "refine.judge_model" and "no-such-model" in err.value.body["message"]


@pytest.mark.engine
def test_option_tokens_are_the_serving_tokenizers(client: OpenAI) -> None:
    from transformers import AutoTokenizer

    resp = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=1,
        extra_body=_rain(max_iterations_per_commit=1, min_iterations_per_commit=1),
    )
    ids = resp.model_extra["refine"]["trace"]["option_token_ids"]
    model_dir = next(m for m in client.models.list() if m.id == MODEL).model_extra["root"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = tokenizer(ANSWER_LINE)["input_ids"]
    for letter, token in zip("AB", ids, strict=True):
        assert tokenizer(ANSWER_LINE + letter)["input_ids"] == [*base, token]
        assert tokenizer.decode([token]) == letter


@pytest.mark.engine
def test_streaming_sends_each_committed_set_as_it_is_committed(client: OpenAI, engine_url: str) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt="The three primary colours are",
        max_tokens=16,
        seed=3,
        stream=True,
        extra_body=_rain(max_iterations_per_commit=4, min_iterations_per_commit=4),
    )
    pieces, refine, generated_at_first_piece = [], None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            if not pieces:  # what the engine had generated for the search when the first piece arrived
                generated_at_first_piece = _engine_tokens(engine_url)
            pieces.append(chunk.choices[0].text)
        refine = (chunk.model_extra or {}).get("refine") or refine
    commits = refine["trace"]["commits"]
    assert [len(c["tokens"]) for c in commits] == [1, 2, 4, 9]
    assert len(pieces) == len(commits)  # one piece per commit, none held back
    # The first piece left before the later commits were searched, not with the finished answer: the engine
    # was still generating for the search after it arrived (read from the engine's counter, not a clock; a
    # buffered stream would arrive after the last engine token). Nothing else runs in the engine meanwhile.
    # The last commit goes deeper than the first commit's search did, so it generates ~80 tokens, ~0.7 s: far
    # more than the time the counter takes to read. (At 7 tokens the later commits reused the first commit's
    # tree and generated 1-2 tokens in ~0.1 s, and a slow read of the counter once missed them.)
    assert _engine_tokens(engine_url) > generated_at_first_piece


@pytest.mark.engine
@pytest.mark.parametrize("together", [True, False])
def test_a_levels_sets_drawn_together_generate_fewer_tokens_and_the_same_greedy_set(
    client: OpenAI, engine_url: str, together: bool
) -> None:
    """The bundled model's files are readable here, so by default an expansion's greedy set and 9 samples are
    drawn together (policies/rain/set_drawing.py); `draw_together: false` asks vLLM for `n=9` samples. One expansion of
    the root into 4-token sets: either way the greedy child is what the engine decodes greedily and every set has
    the level's length; drawn together, the engine generated fewer tokens than the sets hold (their common
    beginnings once), where `n` generates all 40."""
    prompt = "Once upon a time"
    resp = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=4,
        seed=3,
        extra_body=_rain(
            set_lengths=[4],
            max_iterations_per_commit=2,
            min_iterations_per_commit=2,
            judge_guard=False,
            draw_together=together,
        ),
    )
    trace = resp.model_extra["refine"]["trace"]
    (commit,) = trace["commits"]
    plain = httpx.post(
        f"{engine_url}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "return_token_ids": True},
    ).json()
    greedy = next(c for c in commit["children"] if c["greedy"])
    assert greedy["tokens"] == plain["choices"][0]["token_ids"]
    assert all(len(c["tokens"]) == 4 for c in commit["children"]) and trace["set_tokens"] == 40
    generated = trace["engine"]["expand"]["completion_tokens"]
    assert generated < 40 if together else generated == 40


def _engine_tokens(engine_url: str) -> float:
    return metric_total(httpx.get(f"{engine_url}/metrics").text, "vllm:generation_tokens_total")


@pytest.mark.engine
def test_an_exhausted_call_budget_commits_the_best_node_then_decodes_plainly(client: OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt="List three fruits:", max_tokens=12, temperature=0, extra_body=_rain(max_engine_calls=6)
    )
    trace = resp.model_extra["refine"]["trace"]
    assert trace["budget_exhausted"] == "max_engine_calls"
    engine = trace["engine"]
    assert engine["total"]["calls"] - engine["finish"]["calls"] <= 6
    assert len(trace["commits"]) >= 1 and trace["commits"][-1]["stopped"] == "max_engine_calls"
    assert trace["plain_tokens"] > 0
    assert trace["answer_tokens"] == sum(len(c["tokens"]) for c in trace["commits"]) + trace["plain_tokens"]
    assert resp.choices[0].text


@pytest.mark.engine
def test_the_wall_time_budget_bounds_the_search(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=40,
        extra_body=_rain(max_seconds=2.0),
    )
    trace = resp.model_extra["refine"]["trace"]
    assert trace["budget_exhausted"] == "max_seconds"
    assert sum(c["seconds"] for c in trace["commits"]) < 2.0 + 3.0  # unbounded: a minute or more
    assert resp.choices[0].message.content


@pytest.mark.engine
def test_a_stop_string_ends_the_answer_where_it_appears(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        stop=[" "],
        extra_body=_rain(max_iterations_per_commit=3, min_iterations_per_commit=3),
    )
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert text and " " not in text
    assert len(resp.model_extra["refine"]["trace"]["commits"]) < 4  # the search ended with the stop string


@pytest.mark.engine
def test_parallel_leaves_search_on_the_real_engine(client: OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=3,
        seed=1,
        extra_body=_rain(
            parallel_leaves=4, max_iterations_per_commit=8, min_iterations_per_commit=8, judge_guard=False
        ),
    )
    trace = resp.model_extra["refine"]["trace"]
    assert [c["iterations"] for c in trace["commits"]] == [8, 8]  # sets of 1 and 2 tokens
    assert trace["answer_tokens"] == 3 and resp.choices[0].text


@pytest.mark.engine
def test_bad_rain_parameters_are_400s(client: OpenAI) -> None:
    import openai

    messages = [{"role": "user", "content": "Hi"}]
    for refine, param in [
        ({"criterion": "custom"}, "refine"),
        ({"max_iterations_per_commit": 1000}, "refine.max_iterations_per_commit"),
        ({"set_lengths": [0]}, "refine"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=messages, extra_body=_rain(**refine))
        assert err.value.body["param"].startswith(param)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, n=2, extra_body=_rain())
    assert err.value.body["param"] == "n"


@pytest.mark.engine
def test_search_metrics_are_exported_per_policy(client: OpenAI, refine_server) -> None:
    client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=2,
        extra_body=_rain(max_iterations_per_commit=2, min_iterations_per_commit=2),
    )
    text = httpx.get(f"{refine_server.url}/metrics").text
    for family in (
        "refine_search_iterations_per_request",
        "refine_rewinds_per_request",
        "refine_engine_calls_per_request",
    ):
        assert re.search(rf'^{family}_count{{policy="rain"}} [1-9]', text, re.M), family
    assert re.search(r'^refine_engine_calls_per_request_sum{policy="rain"} [1-9]', text, re.M)


def _engine_idle_for(engine_url: str, seconds: float) -> bool:
    """True once the engine has no running request and starts none for `seconds`."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(f"{engine_url}/metrics").text
        if metric_total(text, "vllm:num_requests_running") == 0:
            finished = metric_total(text, "vllm:e2e_request_latency_seconds_count")
            time.sleep(seconds)
            text = httpx.get(f"{engine_url}/metrics").text
            if metric_total(text, "vllm:e2e_request_latency_seconds_count") == finished:
                return metric_total(text, "vllm:num_requests_running") == 0
        time.sleep(0.2)
    return False


@pytest.mark.engine
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_the_search(refine_server, engine_url: str, stream: bool) -> None:
    body = {
        "model": MODEL,
        "prompt": "Write a long story about a dragon:",
        "max_tokens": 300,
        "stream": stream,
        **_rain(max_iterations_per_commit=5, min_iterations_per_commit=5),
    }
    if stream:
        with httpx.stream("POST", f"{refine_server.url}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            next(line for line in resp.iter_lines() if line.startswith("data:"))  # the first commit
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{refine_server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=4.0))
    assert _engine_idle_for(engine_url, 2.0), "the search kept calling the engine after the client left"
