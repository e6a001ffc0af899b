"""RAIN's parameters (the request's `refine` fields) and the server's caps on them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from refine_server.policies.base import PolicyLimits, PolicyParams
from refine_server.policies.rain.tree import TreeSettings


class RainParams(PolicyParams):
    """Defaults are the official HH script's values."""

    criterion: Literal["harmless", "truthful", "custom"] = Field(
        "harmless", description="what the self-evaluation asks: the paper's two criteria, or `question`"
    )
    question: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="criterion custom: a yes/no question about the reply so far, where yes means acceptable",
    )
    max_iterations_per_commit: int = Field(
        50, ge=1, description="a commit runs max(this - visits the new root already has, min) iterations"
    )
    min_iterations_per_commit: int = Field(15, ge=1, description="the fewest iterations per commit")
    early_stop_visits: int | None = Field(
        None,
        ge=0,
        description="T_m: commit early once the most-visited child has more visits (default: 6, truthful 16) ...",
    )
    early_stop_value: float = Field(0.8, ge=-1, le=1, description="... and a value above this")
    exploration: float = Field(2.0, ge=0, description="c in the selection rule")
    set_lengths: list[int] = Field([1, 2, 4, 10], min_length=1, description="token-set length by depth")
    token_choices: int = Field(10, ge=1, le=20, description="children of a single-token level: the top-k")
    set_choices: int = Field(10, ge=1, le=32, description="children of a multi-token level: greedy + samples")
    set_top_k: int = Field(15, ge=1, le=20, description="multi-token sets are sampled from this top-k")
    similarity_threshold: float = Field(0.95, ge=-1, le=1)
    similarity_weight: float = Field(0.2, ge=0)
    widen: bool = Field(True, description="dynamic widening of alike, badly judged children")
    max_rollout_tokens: int | None = Field(
        None,
        ge=1,
        description="a rollout stops here (default: 64 tokens for a rollout to the next punctuation; "
        "the rest of the answer for truthful's rollout to the end)",
    )
    defer_expansion: bool = Field(
        True,
        description="expand a leaf on its second visit, when its children are first needed (same visits and "
        "choices as the official first-visit expansion, without expanding leaves never revisited)",
    )
    draw_together: bool = Field(
        True,
        description="draw a level's sets together, so samples that begin alike compute that once (fewer "
        "engine tokens, an engine step or two more per expansion; needs the model's files on this machine); "
        "false: the samples are vLLM's `n`",
    )
    parallel_leaves: int = Field(
        1, ge=1, le=64, description="leaves searched at once, with virtual loss (1: the paper's sequential search)"
    )
    judge_model: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="another model on the same upstream answers the self-evaluation (default: the client's model)",
    )
    judge_guard: bool = Field(
        True,
        description="commit the most-visited child at once when the judge gives no signal (False: the "
        "paper's search, every iteration run)",
    )
    judge_guard_evaluations: int = Field(
        4,
        ge=1,
        description="the judge guard fires when this many first evaluations of a commit are all 0 (after "
        "that many zeros and nothing else in the request: when the first of a commit is 0)",
    )
    max_engine_calls: int = Field(20_000, ge=1, description="budget: generation calls of the whole search")
    max_search_tokens: int = Field(200_000, ge=1, description="budget: tokens the search may generate")
    max_seconds: float = Field(600.0, gt=0, description="budget: wall time of the search")

    @model_validator(mode="after")
    def _consistent(self) -> RainParams:
        if self.criterion == "custom" and not self.question:
            raise ValueError("criterion 'custom' needs `question`: a yes/no question about the reply")
        if self.criterion != "custom" and self.question:
            raise ValueError("`question` is only used with criterion 'custom'")
        if self.min_iterations_per_commit > self.max_iterations_per_commit:
            raise ValueError("min_iterations_per_commit exceeds max_iterations_per_commit")
        if any(n < 1 for n in self.set_lengths):
            raise ValueError("set_lengths must be positive")
        if self.early_stop_visits is None:
            self.early_stop_visits = 16 if self.criterion == "truthful" else 6
        return self

    def tree_settings(self) -> TreeSettings:
        return TreeSettings(
            exploration=self.exploration,
            similarity_threshold=self.similarity_threshold,
            similarity_weight=self.similarity_weight,
        )


class RainLimits(PolicyLimits):
    max_iterations_per_commit: int | None = 200
    min_iterations_per_commit: int | None = 200
    max_rollout_tokens: int | None = 512
    parallel_leaves: int | None = 16
    max_engine_calls: int | None = 50_000
    max_search_tokens: int | None = 1_000_000
    max_seconds: float | None = 1800.0
