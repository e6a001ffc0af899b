"""Where `auto`'s threshold comes from when a request sets none: a calibration per model.

`bench/calibrate.py` fits, on the suite's dev split, the threshold of every signal at which escalation reaches
a chosen rate (or a chosen accuracy) and writes one small JSON file per model:

    {"model": "SmolLM2-135M-Instruct",
     "thresholds": {"cyberv_direct": {"lowest_group_confidence": 11.2, ...}, "request": {...}},
     "fitted": {"split": "suite-dev", "items": 160, "target": {"escalation_rate": 0.5}, ...}}

The thresholds are per first call, because the first answer is not always the same request: escalating to
cyberv, it is CyberV's own direct-answer call (`cyberv_direct`), otherwise the client's request as sent
(`request`), and the two prompts give different confidences. refine ships a file for each bundled model
(`refine_server/models/calibration/`); `--auto-calibration FILE` adds or replaces the one for the model the
file names. Without either, a signal's `DEFAULT_THRESHOLDS` applies (the bundled SmolLM2's dev thresholds at a
50% escalation rate on cyberv's direct answers: a middling point for a small model, not a tuned one).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from refine_server.policies.auto.signals import Signal

FirstCall = Literal["cyberv_direct", "request"]
SHIPPED = "refine_server.models"  # the package whose calibration/ folder holds the bundled models' files

DEFAULT_THRESHOLDS: dict[Signal, float] = {
    "lowest_group_confidence": 5.77,
    "tail_confidence": 5.80,
    "mean_entropy": 1.75,
    "max_entropy": 4.31,
    "answer_margin": 0.30,
}


class Calibration(BaseModel):
    """One model's calibration file."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the model id requests name")
    thresholds: dict[FirstCall, dict[Signal, float]]
    fitted: dict[str, Any] = Field(default_factory=dict, description="how it was fitted: split, target, items")

    @classmethod
    def read(cls, path: Path) -> Calibration:
        """A file's calibration; ValueError (pydantic's included) where it is not one."""
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))


class Calibrations:
    """The calibration of every model refine knows one for: the shipped files, then the operator's file."""

    def __init__(self, calibrations: list[tuple[Calibration, str]]):
        self._by_model = {c.model: (c, source) for c, source in calibrations}

    @classmethod
    def load(cls, operator_file: Path | None = None) -> Calibrations:
        """The shipped files, and `operator_file` over them; a bad file stops refine at start."""
        shipped = files(SHIPPED) / "calibration"
        found = [
            (Calibration.model_validate_json(entry.read_text(encoding="utf-8")), f"shipped:{entry.name}")
            for entry in sorted(shipped.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".json")
        ]
        if operator_file is not None:
            found.append((Calibration.read(operator_file), f"file:{operator_file}"))
        return cls(found)

    def threshold(self, model: str, first_call: FirstCall, signal: Signal) -> tuple[float, str]:
        """The threshold for a request that sets none, and where it came from (`shipped:NAME`, `file:PATH` or
        `default`)."""
        entry = self._by_model.get(model)
        if entry is not None:
            calibration, source = entry
            value = calibration.thresholds.get(first_call, {}).get(signal)
            if value is not None:
                return value, source
        return DEFAULT_THRESHOLDS[signal], "default"
