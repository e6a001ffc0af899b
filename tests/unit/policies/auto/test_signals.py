"""policies.auto.signals and calibration: the measures from fake statistics, the decision's sides, the
calibration files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from refine_server.config import Settings
from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry
from refine_server.policies.auto import AutoPolicy
from refine_server.policies.auto.calibration import DEFAULT_THRESHOLDS, Calibrations
from refine_server.policies.auto.signals import ApiToken, Reading, api_tokens, is_sure, measure, tokens_of_span
from refine_server.policies.token_stats import ChoiceTokenStats


def _stats(confidence: list[float], entropy: list[float], margin: list[float]) -> ChoiceTokenStats:
    n = len(entropy)
    return ChoiceTokenStats(
        token_ids=list(range(n)),
        entropy=entropy,
        varentropy=[0.0] * n,
        margin=margin,
        prob=[0.5] * n,
        confidence=confidence,
        missing=0,
    )


def test_signals_from_engine_statistics() -> None:
    stats = _stats([10.0, 2.0, 8.0, 12.0], [0.1, 1.5, 0.3, math.nan], [0.9, 0.1, 0.5, 0.7])
    reading = Reading.from_engine(stats, [ApiToken(1, [])] * 4)
    signals = measure(reading, [2, 3], window=2)
    assert signals["lowest_group_confidence"] == pytest.approx(5.0)  # windows (10,2), (2,8), (8,12)
    assert signals["tail_confidence"] == pytest.approx(10.0)
    assert signals["mean_entropy"] == pytest.approx((0.1 + 1.5 + 0.3) / 3)  # NaN skipped, not zero
    assert signals["max_entropy"] == pytest.approx(1.5)
    assert signals["answer_margin"] == pytest.approx(0.6)  # the answer's tokens only
    assert measure(reading, None, window=2)["answer_margin"] == pytest.approx(2.2 / 4)


def test_engine_without_confidence_and_empty_answers_are_not_measured() -> None:
    old = _stats([], [0.1, 0.2], [0.9, 0.9])  # no confidence reported (an older plugin)
    signals = measure(Reading.from_engine(old, []), None, 64)
    assert math.isnan(signals["lowest_group_confidence"]) and signals["max_entropy"] == pytest.approx(0.2)
    empty = measure(Reading.from_api([]), None, 64)
    assert all(math.isnan(v) for v in empty.values())


def test_api_reading_is_deepconfs_confidence_over_the_top_k() -> None:
    top = [math.log(0.6), math.log(0.3), math.log(0.1)]
    reading = Reading.from_api([ApiToken(1, top)], k=20)
    assert reading.confidence == [pytest.approx(-sum(top) / 3)]
    assert reading.margin == [pytest.approx(0.3)]
    expected_h = -sum(p * math.log(p) for p in (0.6, 0.3, 0.1))
    assert reading.entropy == [pytest.approx(expected_h)]


def test_api_tokens_of_chat_and_completions_choices() -> None:
    chat = {"logprobs": {"content": [{"token": "é", "logprob": -0.1, "bytes": [195, 169], "top_logprobs": []}]}}
    assert api_tokens(chat) == [ApiToken(2, [])]
    completions = {"logprobs": {"tokens": ["a", "bc"], "top_logprobs": [{"a": -0.1, "b": -2.0}, None]}}
    assert api_tokens(completions) == [ApiToken(1, [-0.1, -2.0]), ApiToken(2, [])]


def test_answer_span_maps_to_its_tokens() -> None:
    text = "The answer is 42."
    nbytes = [3, 7, 3, 3, 1]  # "The", " answer", " is", " 42", "."
    assert tokens_of_span(text, nbytes, text.index("42"), text.index("42") + 2) == [3]


def test_each_signal_is_sure_on_its_own_side_and_nan_never_is() -> None:
    assert is_sure("lowest_group_confidence", 5.0, 5.0) and not is_sure("lowest_group_confidence", 4.9, 5.0)
    assert is_sure("answer_margin", 0.9, 0.5) and not is_sure("answer_margin", 0.4, 0.5)
    assert is_sure("mean_entropy", 0.2, 0.2) and not is_sure("mean_entropy", 0.3, 0.2)
    assert not is_sure("max_entropy", math.nan, 100.0) and not is_sure("tail_confidence", math.nan, -100.0)


def test_calibration_files_operator_over_shipped_over_default(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    path.write_text(
        json.dumps({"model": "m", "thresholds": {"cyberv_direct": {"answer_margin": 0.42}}, "fitted": {"split": "dev"}})
    )
    calibrations = Calibrations.load(path)
    assert calibrations.threshold("m", "cyberv_direct", "answer_margin") == (0.42, f"file:{path}")
    assert calibrations.threshold("m", "request", "answer_margin") == (DEFAULT_THRESHOLDS["answer_margin"], "default")
    assert calibrations.threshold("other", "cyberv_direct", "max_entropy")[1] == "default"
    shipped = Calibrations.load().threshold("SmolLM2-135M-Instruct", "cyberv_direct", "lowest_group_confidence")
    assert shipped[1] == "shipped:SmolLM2-135M-Instruct.json"


def test_a_bad_calibration_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": "m", "thresholds": {"cyberv_direct": {"no_such_signal": 1.0}}}))
    with pytest.raises(ValueError):
        Calibrations.load(path)


def test_the_servers_setting_reaches_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"model": "m", "thresholds": {"request": {"max_entropy": 2.5}}}))
    settings = Settings(auto_calibration=path)
    auto = PolicyRegistry(BUILTIN_POLICIES, settings.policy_limits, settings.policy_options()).get("auto")
    assert isinstance(auto, AutoPolicy)
    assert auto.calibrations.threshold("m", "request", "max_entropy") == (2.5, f"file:{path}")
