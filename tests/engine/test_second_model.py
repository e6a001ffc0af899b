"""The second bundled model, from another family (Qwen2.5-Coder-0.5B-Instruct: 152k vocabulary, untied lm_head,
Qwen's chat template with a tool section), served by name on its own refine and engine (conftest's
`second_family_server`, float32). Everything that depends on the model is read from it: these tests check that
nothing assumed SmolLM2. They are few and short: one engine start, a handful of tokens each."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from refine_server.contract.params import SRGenParams
from refine_server.policies.engine_client import EngineClient
from refine_server.policies.rain.search import ANSWER_LINE
from tests.conftest import (
    ENGINE_PORT,
    SECOND_FAMILY_MODEL,
    SECOND_FAMILY_PORT_OFFSET,
    RunningServer,
    engine_client_on,
)
from tests.engine.reference import (
    assert_correction_matches,
    assert_token_stats_match,
    load_float32,
    model_dir,
    srgen_distributions,
)

MODEL = SECOND_FAMILY_MODEL
PROMPT = "The three primary colours are"
FORCE = {"warmup_threshold": 0.0, "min_threshold": 0.0}  # every monitored token triggers a correction
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(second_family_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{second_family_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def folder(client: OpenAI) -> Path:
    return Path(model_dir(client, MODEL))


@pytest.fixture(scope="module")
def reference(folder: Path) -> Iterator[Any]:
    """The served model in transformers, float32, loaded once for the recomputations."""
    yield load_float32(str(folder))


@pytest.fixture
async def engine(second_family_server: RunningServer) -> AsyncIterator[EngineClient]:
    """An EngineClient on the second model's engine, as a policy gets one from refine."""
    async with engine_client_on(ENGINE_PORT + SECOND_FAMILY_PORT_OFFSET, PROMPT, model=MODEL, timeout_s=300) as engine:
        yield engine


def _end_ids(folder: Path) -> set[int]:
    configured = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    return set(configured if isinstance(configured, list) else [configured])


def test_served_by_name_from_its_converted_folder_and_ends_at_its_own_end_of_sequence(
    client: OpenAI, folder: Path
) -> None:
    assert folder.name == MODEL
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] > 150_000 and not config["tie_word_embeddings"]

    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
        max_tokens=32,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content
    # vLLM stopped at the model's own end-of-sequence token (not SmolLM2's), and kept it out of the text.
    assert choice.model_extra["token_ids"][-1] in _end_ids(folder)
    assert "<|" not in choice.message.content


def test_a_forced_srgen_correction_matches_a_recomputation_over_the_152k_vocabulary(
    client: OpenAI, reference: Any
) -> None:
    params = SRGenParams(lr=0.5, steps=3, lam=0.05, max_corrections=3, **FORCE)
    resp = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        extra_body={"refine": {"policy": "srgen", **params.model_dump()}, "return_token_ids": True},
    )
    correction = resp.model_extra["refine"]["trace"]["corrections"][2]
    assert correction["output_index"] == 3
    output_ids = resp.choices[0].model_extra["token_ids"]
    assert output_ids[3] == correction["token_after"]["id"]  # the correction reached the output
    context = resp.choices[0].model_extra["prompt_token_ids"] + output_ids[:3]
    before, after = srgen_distributions(reference, context, params)
    assert before.numel() == reference.config.vocab_size
    # Both sides compute in float32 here; what is left is vLLM's kernels against transformers'.
    assert_correction_matches(correction, before, after, tol=0.01)


async def test_the_engine_sensor_matches_a_recomputation_over_the_152k_vocabulary(
    engine: EngineClient, reference: Any
) -> None:
    assert await engine.token_stats_unavailable() is None
    response, stats = await engine.completions_with_token_stats("test", PROMPT, max_tokens=8, temperature=0)
    (choice,) = response["choices"]
    got = stats[0]
    assert got.missing == 0 and got.token_ids == choice["token_ids"] and len(got.token_ids) >= 4
    assert_token_stats_match(reference, choice, got)


def test_cyberv_answers_through_the_official_client(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 1 + 1?"}],
        max_tokens=16,
        seed=0,
        extra_body={"refine": {"policy": "cyberv", "n": 3, "max_reasoning_tokens": 16, "max_feedback_tokens": 16}},
    )
    trace = resp.model_extra["refine"]["trace"]
    assert trace["decision"] in ("accepted", "feedback") and trace["sensor_source"] == "engine"
    assert resp.choices[0].message.content and trace["candidates"]
    assert resp.usage.completion_tokens > 0


def test_rain_answers_through_the_official_client_with_the_models_own_option_tokens(
    client: OpenAI, folder: Path
) -> None:
    from transformers import AutoTokenizer

    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=2,
        seed=0,
        extra_body={"refine": {"policy": "rain", "max_iterations_per_commit": 2, "min_iterations_per_commit": 2}},
    )
    trace = resp.model_extra["refine"]["trace"]
    assert resp.choices[0].message.content and trace["commits"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = tokenizer(ANSWER_LINE)["input_ids"]
    for letter, token in zip("AB", trace["option_token_ids"], strict=True):
        assert tokenizer(ANSWER_LINE + letter)["input_ids"] == [*base, token]


def test_langchain_bind_tools_gets_a_tool_call(second_family_server: RunningServer) -> None:
    import langchain_openai

    llm = langchain_openai.ChatOpenAI(
        base_url=f"{second_family_server.url}/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=24,
        max_retries=0,
        timeout=300,
    )
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"], dict)
