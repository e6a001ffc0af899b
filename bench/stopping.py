"""CyberV's adaptive round 1 replayed over stored cyberv-full candidates: where its stopping rule would have
stopped, what it would have decided, and what that cost, with no engine call. `quality.py report` builds its
stopping tables from these.

- `forecast_round`: after each candidate, whether the certain rule stops there, the share of the forecast's
  completions (`stopping.forecast`) behind its decision, and whether that decision is all n's;
- `replay`: a rule given as a threshold on that share per number of candidates drawn, over those steps;
  `stop_risk_rule` is the policy's rule (`stopping.outlook`) in that form, at any batch size;
- `fit_thresholds`: the thresholds that would have spent the fewest tokens at a required agreement, chosen on
  the very outcomes they are scored on. Not a rule anyone can run (it is fitted in-sample); it shows how far
  any threshold on this forecast could go;
- `pooled_rounds`: rounds of more than the stored n, the reasoning candidates of several seeds' runs joined;
- `concentration_prior`: a prior over the forecast urn's concentration fitted to stored rounds (empirical
  Bayes); `python bench/stopping.py` prints it for SmolLM2's dev split over a grid wider than the forecast's, which
  is why `stopping.CONCENTRATIONS` ends where it does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refine_server.policies.answer_extraction import Answer
from refine_server.policies.cyberv.sensor import SIGNAL_WEIGHT, Candidate, Generation, rank_ascending
from refine_server.policies.cyberv.stopping import Outlook, concentration_likelihood, outlook, settle

NEVER = 2.0  # a threshold no share reaches: at that draw only the certain rule stops
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.0, NEVER)
PENALTIES = (0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # tokens saved against decisions lost, for the threshold fit


def ballots(candidates: list[dict], n: int) -> list[Candidate]:
    """The first m traced candidates as the sensor scored them with m drawn: s1..s4 as traced (they do not
    depend on later candidates), s5 the rank among the m by p over n. The traced s5 orders them: it is their
    rank by the unrounded p (traced s1 is rounded, which would reorder near-ties)."""
    ranks = rank_ascending([c["signals"]["s5"] for c in candidates])
    out = []
    for c, rank in zip(candidates, ranks):
        ballot = Candidate(c["index"], c["kind"], Generation("", [], None))
        ballot.answer = Answer(c["answer_kind"], c["answer"]) if c["answer"] is not None else None
        ballot.signals = {**{s: c["signals"][s] for s in ("s1", "s2", "s3", "s4")}, "s5": rank / n}
        ballot.score = SIGNAL_WEIGHT * sum(ballot.signals.values())
        out.append(ballot)
    return out


def decision(drawn: list[Candidate], n: int, theta: float, stop: Outlook | None = None) -> tuple[str, str | None]:
    decided = settle(drawn, n * theta, stop)
    return decided.action, decided.best.answer.value if decided.best.answer else None


def same_decision(early: tuple[str, str | None], full: tuple[str, str | None]) -> bool:
    """The gate decided alike: the same answer accepted, or the feedback round both times (which candidate's
    spike it quotes may differ: the rule stops once no answer can pass the gate, not once the best is known)."""
    return early[0] == full[0] and (full[0] != "accepted" or early[1] == full[1])


def tokens(candidates: list[dict]) -> int:
    return sum(c["completion_tokens"] for c in candidates)


def pooled_rounds(runs: dict[int, dict[str, dict]], n: int) -> list[dict]:
    """Traces of n candidates per item run (with the item's `id`): the run's own direct answer, then the reasoning
    candidates of its seed and of the next seeds in turn (seeds rotated, so each run leads once). Samples of
    different seeds are independent draws from the same prompt and sampling parameters, so a pooled round is a
    round of n that was never run but could have been: its replays need no engine call."""
    seeds = sorted(runs)
    rounds = []
    for lead, seed in enumerate(seeds):
        order = seeds[lead:] + seeds[:lead]
        for item_id, row in runs[seed].items():
            reasoning = [c for s in order for c in runs[s][item_id]["trace"]["candidates"] if c["kind"] == "reasoning"]
            if len(reasoning) < n - 1:
                raise ValueError(
                    f"{len(seeds)} runs hold {len(reasoning)} reasoning candidates of {item_id}, "
                    f"not the {n - 1} a round of {n} needs"
                )
            candidates = [row["trace"]["candidates"][0], *reasoning[: n - 1]]
            rounds.append({"id": item_id, "candidates": [{**c, "index": i} for i, c in enumerate(candidates)]})
    return rounds


@dataclass(frozen=True)
class Step:
    """Round 1 after `drawn` candidates: could it stop there, and would it decide as all n."""

    drawn: int
    tokens: int
    certain: bool  # the certain rule stops here
    share: float  # of the forecast completions that decide one way (0: no forecast decision to stop on)
    same: bool  # stopping here decides as all n do


@dataclass(frozen=True)
class Round:
    """One round 1 of n candidates, seen after each of them."""

    n: int
    tokens: int  # of all n
    steps: list[Step]  # after 2, 3, ..., n - 1 candidates


def forecast_round(trace: dict, n: int, theta: float) -> Round:
    """Every point where round 1 could stop, with the forecast's share there. The forecast is asked at
    stop_risk 0.5, so it names its decision wherever one holds a majority of its completions."""
    candidates = trace["candidates"][:n]
    full = decision(ballots(candidates, n), n, theta)
    steps = []
    for m in range(2, n):
        drawn = ballots(candidates[:m], n)
        stop = outlook(drawn, n, n * theta, stop_risk=0.5)
        same = bool(stop.settled) and same_decision(decision(drawn, n, theta, stop), full)
        steps.append(
            Step(
                m,
                tokens(candidates[:m]),
                stop.certain and bool(stop.settled),
                stop.share if stop.settled else 0.0,
                same,
            )
        )
    return Round(n, tokens(candidates), steps)


@dataclass(frozen=True)
class Replayed:
    """A stopping rule over a set of rounds."""

    drawn: float  # candidates drawn per round
    agreed: int  # rounds decided as all n decide
    spent: tuple[int, ...]  # each round's tokens, in the rounds' order
    full: tuple[int, ...]  # each round's tokens with all n drawn

    @property
    def rounds(self) -> int:
        return len(self.spent)

    @property
    def tokens(self) -> float:
        """Completion tokens per round."""
        return sum(self.spent) / self.rounds

    @property
    def ratio(self) -> float:
        """Tokens against drawing all n (self-consistency at n on the same samples)."""
        return sum(self.spent) / sum(self.full)

    @property
    def same(self) -> float:
        return self.agreed / self.rounds


def stop_risk_rule(n: int, batch: int, stop_risk: float) -> dict[int, float]:
    """The policy's rule as thresholds: it looks after the direct answer and each batch, and stops where
    certain or where the forecast's share reaches 1 - stop_risk (stop_risk 0: only where certain)."""
    return dict.fromkeys(range(1 + batch, n, batch), 1 - stop_risk if stop_risk > 0 else NEVER)


def replay(rounds: list[Round], thresholds: dict[int, float]) -> Replayed:
    """Round 1 stops at the first draw it looks at (a key of `thresholds`) that is certain or whose forecast
    share reaches that draw's threshold; where it never stops it draws all n, and decides as all n do."""
    drawn = agreed = 0
    spent = []
    for r in rounds:
        stop = next(
            (s for s in r.steps if s.drawn in thresholds and (s.certain or s.share >= thresholds[s.drawn])), None
        )
        drawn += r.n if stop is None else stop.drawn
        spent.append(r.tokens if stop is None else stop.tokens)
        agreed += stop is None or stop.same
    return Replayed(drawn / len(rounds), agreed, tuple(spent), tuple(r.tokens for r in rounds))


def fit_thresholds(rounds: list[Round], target: float) -> tuple[dict[int, float], Replayed]:
    """The thresholds per draw, from THRESHOLDS, that spend the fewest tokens while deciding as all n on at
    least `target` of these rounds. Searched by coordinate descent on tokens + penalty * decisions lost, for
    each penalty in PENALTIES and from each uniform start; the cheapest setting seen that meets the target
    wins. In-sample by design (see the module doc)."""
    never = {s.drawn: NEVER for r in rounds for s in r.steps}
    forecast = sorted({s.drawn for r in rounds for s in r.steps if s.share > 0})  # the draws worth a threshold
    best = (never, replay(rounds, never))

    def scored(thresholds: dict[int, float], penalty: float) -> float:
        nonlocal best
        replayed = replay(rounds, thresholds)
        if replayed.same >= target and replayed.ratio < best[1].ratio:
            best = (dict(thresholds), replayed)
        return replayed.ratio + penalty * (1 - replayed.same)

    for penalty in PENALTIES:
        for start in THRESHOLDS:
            current = {**never, **dict.fromkeys(forecast, start)}
            for _ in range(4):
                before = dict(current)
                for m in forecast:
                    current[m] = min(THRESHOLDS, key=lambda t: scored({**current, m: t}, penalty))
                if current == before:
                    break
    return best


WIDE_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # concentrations up to 100: samples nearly all distinct


def concentration_prior(traces: list[dict], grid: tuple[float, ...], iterations: int = 500) -> tuple[float, ...]:
    """Empirical Bayes for the forecast's urn: the weights over `grid` that maximise the likelihood of how many
    distinct answers each round's reasoning samples gave (Ewens' formula, the statistic the forecast reads),
    found by EM from equal weights, rounded to 3 places."""
    counts = []
    for trace in traces:
        samples = [b for b in ballots(trace["candidates"], len(trace["candidates"])) if b.kind == "reasoning"]
        counts.append((len(samples), len({b.answer for b in samples})))
    prior = [1 / len(grid)] * len(grid)
    for _ in range(iterations):
        expected = [0.0] * len(grid)
        for samples, distinct in counts:
            joint = [p * like for p, like in zip(prior, concentration_likelihood(samples, distinct, grid))]
            expected = [e + j / sum(joint) for e, j in zip(expected, joint)]
        prior = [e / len(counts) for e in expected]
    return tuple(round(p, 3) for p in prior)


def dev_rounds() -> list[dict]:
    dev = Path(__file__).parent / "results" / "quality" / "SmolLM2-135M-Instruct" / "dev"
    return [
        json.loads(line)["trace"]
        for path in sorted(dev.glob("cyberv-full-s*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


if __name__ == "__main__":
    rounds = dev_rounds()
    fitted = concentration_prior(rounds, WIDE_GRID)
    print(f"{len(rounds)} dev rounds; concentration: fitted prior weight")
    for concentration, weight in zip(WIDE_GRID, fitted):
        print(f"{concentration:6g}: {weight:.3f}")
