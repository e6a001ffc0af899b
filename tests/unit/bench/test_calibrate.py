"""bench/calibrate.py and bench/auto_replay.py: thresholds fitted at a rate or an accuracy, auto replayed."""

from __future__ import annotations

import math

from auto_replay import replay
from calibrate import escalation_rate, fit_accuracy, fit_rate

VALUES = [1.0, 2.0, 3.0, 4.0, math.nan]  # the last item could not be measured: it always escalates


def test_rate_fits_count_unmeasured_items_as_escalated() -> None:
    t = fit_rate(VALUES, "lowest_group_confidence", 0.6)
    assert t == 3.0 and escalation_rate(VALUES, "lowest_group_confidence", t) == 0.6  # 1, 2 and the NaN
    t = fit_rate(VALUES, "mean_entropy", 0.6)  # entropies are sure low: the high ones escalate
    assert t == 2.0 and escalation_rate(VALUES, "mean_entropy", t) == 0.6
    assert escalation_rate(VALUES, "answer_margin", fit_rate(VALUES, "answer_margin", 0.0)) == 0.2


def test_accuracy_fit_takes_the_fewest_escalations_that_reach_it() -> None:
    first = [False, True, True, True, False]
    escalated = [True, True, False, False, True]
    t, accuracy, rate = fit_accuracy(VALUES, "lowest_group_confidence", first, escalated, 0.9)
    assert (t, accuracy, rate) == (2.0, 1.0, 0.4)  # escalating the first item (and the NaN one) is needed and enough


def test_replay_takes_the_first_answer_where_sure_and_the_escalations_elsewhere() -> None:
    probe = [
        {"id": str(i), "correct": i % 2 == 0, "completion_tokens": 5, "trace": {"signals": {"answer_margin": v}}}
        for i, v in enumerate([0.9, 0.1, 0.8, None])
    ]
    escalation = {str(i): {"correct": True, "completion_tokens": 100} for i in range(4)}
    point = replay(probe, escalation, "answer_margin", 0.5, request=False)
    assert point["escalation_rate"] == 0.5 and point["accuracy"] == 1.0 and point["tokens_per_item"] == 52.5
    assert replay(probe, escalation, "answer_margin", 0.5, request=True)["tokens_per_item"] == 55.0
