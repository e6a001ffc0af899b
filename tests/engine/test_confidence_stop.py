"""DeepConf's confidence stop inside the real engine: where it stops a greedy trace, that it never stops one it
should not, that the confidences it reports and the window means it stops on are a recomputation's from the
API's own `top_logprobs`, that it waits for min_tokens, and what it refuses.

On conftest's float32 engine (as the sensor's tests): the recomputation reads vLLM's float32 log-probabilities.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from refine_server.contract.params import ConfidenceStopParams, TokenStatsParams
from refine_server.contract.protocol import signed_xargs
from refine_server.errors import APIError
from refine_server.policies.confidence import group_confidences, token_confidence_from_logprobs
from refine_server.policies.engine_client import EngineClient
from refine_server.policies.token_stats import ChoiceTokenStats
from tests.conftest import ENGINE_PORT, ENGINE_SECRET, FLOAT32_PORT_OFFSET, MODEL, RunningServer, engine_client_on
from tests.engine.reference import model_dir

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
TOKENS = 40
# vLLM's log-probabilities and the sensor's top-k are both float32 log-softmaxes of the same float32 logits over
# a 49152-token vocabulary: each log p is within a few 1e-6 of the other's (rounding of the log normaliser and
# of the subtraction), so a mean of 20 of them, and a window mean of those, agree far inside 1e-3.
TOL = 1e-3
NEVER = -1.0  # C = mean of -log p >= 0: no confidence is below this
ALWAYS = 1e9  # nor above this


@pytest.fixture
async def engine(float32_server: RunningServer) -> AsyncIterator[EngineClient]:
    async with engine_client_on(ENGINE_PORT + FLOAT32_PORT_OFFSET, "unused", timeout_s=120) as engine:
        yield engine


@pytest.fixture(scope="module")
def eos_token_id(float32_server: RunningServer) -> int:
    from transformers import AutoTokenizer

    client = OpenAI(base_url=f"{float32_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    return AutoTokenizer.from_pretrained(model_dir(client, MODEL)).eos_token_id


async def _greedy(
    engine: EngineClient, stop: ConfidenceStopParams | None, **fields: Any
) -> tuple[dict[str, Any], ChoiceTokenStats]:
    sensor = TokenStatsParams(confidence_k=20, stop=stop)
    fields = {"max_tokens": TOKENS, "temperature": 0, **fields}
    response, stats = await engine.chat_with_token_stats("test", MESSAGES, sensor=sensor, **fields)
    (choice,) = response["choices"]
    assert stats[0].missing == 0 and stats[0].token_ids == choice["token_ids"]
    return choice, stats[0]


async def test_a_threshold_above_every_confidence_stops_right_after_stop_after_tokens(
    engine: EngineClient, eos_token_id: int
) -> None:
    choice, stats = await _greedy(engine, ConfidenceStopParams(threshold=ALWAYS, window=4, stop_after=6))
    assert choice["finish_reason"] == "stop" and stats.stopped_at == 6
    assert len(choice["token_ids"]) == 7 and choice["token_ids"][6] == eos_token_id
    assert not stats.stop_waived


async def test_a_threshold_below_every_confidence_never_stops(engine: EngineClient) -> None:
    plain, _ = await _greedy(engine, None)
    assert plain["finish_reason"] == "length", "the trace ended by itself: the test lost its point"
    choice, stats = await _greedy(engine, ConfidenceStopParams(threshold=NEVER, window=4, stop_after=1))
    assert choice["message"]["content"] == plain["message"]["content"] and choice["finish_reason"] == "length"
    assert stats.stopped_at is None


async def test_confidences_and_the_window_means_the_stop_used_are_a_recomputation_from_top_logprobs(
    engine: EngineClient, eos_token_id: int
) -> None:
    window, stop_after = 4, 4
    free, free_stats = await _greedy(engine, None, logprobs=True, top_logprobs=20)
    expected = [
        token_confidence_from_logprobs([alt["logprob"] for alt in position["top_logprobs"]], 20)
        for position in free["logprobs"]["content"]
    ]
    assert free_stats.confidence == pytest.approx(expected, abs=TOL)

    # A threshold the reference's window means cross once, well inside the tolerance: the stop must fire
    # exactly where the reference says (the mean over tokens [t - window, t) is means[t - 1]).
    means = group_confidences(expected, window)
    crossings = [
        (t, (means[t - 1] + min(means[stop_after - 1 : t - 1])) / 2)
        for t in range(stop_after + 1, TOKENS)
        if means[t - 1] < min(means[stop_after - 1 : t - 1]) - 20 * TOL
    ]
    assert crossings, "the window mean never fell: the test lost its point"
    t, threshold = crossings[-1]
    stop = ConfidenceStopParams(threshold=threshold, window=window, stop_after=stop_after)
    stopped, stats = await _greedy(engine, stop)
    assert stats.stopped_at == t and stopped["token_ids"][t] == eos_token_id
    assert stopped["token_ids"][:t] == free["token_ids"][:t]
    # The forced token's record describes the model's own distribution, not the forced one.
    assert stats.confidence == pytest.approx(expected[: t + 1], abs=TOL)
    assert stats.prob[t] < 0.5


async def test_the_stop_waits_for_min_tokens(engine: EngineClient, eos_token_id: int) -> None:
    choice, stats = await _greedy(engine, ConfidenceStopParams(threshold=ALWAYS, window=2, stop_after=2), min_tokens=9)
    assert stats.stopped_at == 9 and choice["token_ids"][9] == eos_token_id and len(choice["token_ids"]) == 10


async def test_ignore_eos_with_a_stop_is_refused_with_the_reason(engine: EngineClient) -> None:
    with pytest.raises(APIError) as err:
        await _greedy(engine, ConfidenceStopParams(threshold=ALWAYS), ignore_eos=True)
    assert err.value.status == 400 and "ignore_eos" in str(err.value)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ('{"stop": {"threshold": NaN}}', "refine_params.stop.threshold"),
        ('{"stop": {"threshold": 1, "window": 0}}', "refine_params.stop.window"),
        ('{"confidence_k": 21}', "refine_params.confidence_k"),
        ('{"stop": {"threshold": 1, "window": 5000}}', "refine_params.stop.window=5000 exceeds"),
    ],
)
def test_bad_parameters_straight_at_the_engine_get_400s_naming_the_field(
    float32_server: RunningServer, params: str, field: str
) -> None:
    resp = httpx.post(
        f"http://127.0.0.1:{ENGINE_PORT + FLOAT32_PORT_OFFSET}/v1/completions",
        timeout=60,
        json={
            "model": MODEL,
            "prompt": "hi",
            "max_tokens": 5,
            "vllm_xargs": signed_xargs(ENGINE_SECRET, "token_stats", params),
        },
    )
    assert resp.status_code == 400 and field in resp.json()["error"]["message"]
