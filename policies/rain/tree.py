"""RAIN's search tree: nodes, the selection rule, backup with the similarity update, widening and the commit.

Pure bookkeeping, no engine calls: `search.py` decides what to ask the engine and feeds the answers
in here. Numbers follow the official code (github.com/SafeAILab/RAIN, HH/nodes.py), read for the method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

VIRTUAL_LOSS_VISITS = 3
ROOT_SMOOTHING = 0.25  # root priors: 0.75 p + 0.25 uniform, so the first commit explores beyond the top token


@dataclass(frozen=True)
class TokenSet:
    """A candidate continuation from the engine: its token ids and its probability under the expansion."""

    tokens: tuple[int, ...]
    probability: float
    greedy: bool = False
    ends_answer: bool = False  # the model ended its answer here (the end-of-sequence token is not in `tokens`)


@dataclass(eq=False)
class Node:
    """One token set appended to its parent's text.

    `visits` (the paper's N) also counts the fractional visits shared from similar siblings; `true_visits`
    counts only the searches that went through this node. `q` is the mean self-evaluation value.
    """

    tokens: tuple[int, ...]
    prior: float
    depth: int  # token sets between the first root and this node: sets grow with depth
    parent: Node | None = None
    probability: float = 0.0  # the set's own probability, before normalising over its siblings
    greedy: bool = False
    ends_answer: bool = False
    children: list[Node] = field(default_factory=list)
    visits: float = 0.0
    true_visits: int = 0
    q: float = 0.0
    embedding: np.ndarray | None = None  # running mean of the embeddings of the texts evaluated through it
    unused_sets: list[TokenSet] = field(default_factory=list)  # expansion results kept for widening

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def path_from(self, ancestor: Node) -> list[Node]:
        """The nodes below `ancestor` down to this one, top first."""
        path: list[Node] = []
        node: Node | None = self
        while node is not None and node is not ancestor:
            path.append(node)
            node = node.parent
        return path[::-1]

    def tokens_from(self, ancestor: Node) -> list[int]:
        """The token ids the path below `ancestor` down to this node adds to the text."""
        return [t for node in self.path_from(ancestor) for t in node.tokens]

    def most_visited_child(self) -> Node | None:
        """The commit rule: most visits, ties broken by value."""
        return max(self.children, key=lambda c: (c.visits, c.q), default=None)


@dataclass(frozen=True)
class TreeSettings:
    exploration: float = 2.0  # c in the selection rule
    similarity_threshold: float = 0.95
    similarity_weight: float = 0.2
    widen_max_children: int = 20
    widen_variance_per_token: float = 0.03  # children "look alike" below this embedding variance norm per token


class SearchTree:
    """The tree below the committed prefix. Its root is the last committed token set (empty at first)."""

    def __init__(self, settings: TreeSettings):
        self.settings = settings
        self.root = Node(tokens=(), prior=0.0, depth=0)
        # Bounds for normalising q; the official code starts them at the value range [-1, 1].
        self.q_min = -1.0
        self.q_max = 1.0

    # ---- selection ---------------------------------------------------------------------------------------

    def score(self, node: Node) -> float:
        """q_hat + c * p * sqrt(N_parent) / (1 + n): exploit what was judged good, explore what is likely."""
        assert node.parent is not None
        q_hat = 0.0 if node.visits == 0 else (node.q - self.q_min) / (self.q_max - self.q_min + 1e-5)
        explore = self.settings.exploration * node.prior * math.sqrt(node.parent.visits) / (1 + node.visits)
        return q_hat + explore

    def select_child(self, node: Node) -> Node:
        return max(node.children, key=self.score)

    # ---- expansion and widening --------------------------------------------------------------------------

    def expand(self, node: Node, sets: Sequence[TokenSet], keep_for_widening: Sequence[TokenSet] = ()) -> None:
        """Give `node` one child per set, priors normalised over the sets (and smoothed at the root)."""
        node.children = [self._child(node, s, p) for s, p in zip(sets, self._priors(node, sets), strict=True)]
        node.unused_sets = list(keep_for_widening)

    def wants_widening(self, node: Node, set_length: int) -> bool:
        """Widen when the children look alike (low embedding variance) and all are judged bad (best q < 0).
        The variance is the sample variance (N - 1), as torch.var in the official code; "alike" scales with
        the level's set length, not with a child that ended the answer early (its set is shorter)."""
        s = self.settings
        if len(node.children) < 2 or len(node.children) >= s.widen_max_children:
            return False  # one child has no variance (the official code's is NaN, which never widens)
        embeddings = [c.embedding for c in node.children]
        if any(e is None for e in embeddings):
            return False
        spread = float(np.linalg.norm(np.var(np.stack(embeddings), axis=0, ddof=1)))
        return spread < s.widen_variance_per_token * set_length and max(c.q for c in node.children) < 0

    def add_children(self, node: Node, sets: Sequence[TokenSet]) -> int:
        """Widening: add the sets `node` does not have yet; each prior is its probability normalised with its
        siblings' (the existing children keep theirs). Returns how many were added."""
        known = {c.tokens for c in node.children}
        new = [s for s in dict.fromkeys(sets) if s.tokens not in known]
        if not new:
            return 0
        total = sum(c.probability for c in node.children) + sum(s.probability for s in new)
        k = len(node.children) + len(new)
        for s in new:
            prior = s.probability / total if total > 0 else 1.0 / k
            if node is self.root:
                prior = (1 - ROOT_SMOOTHING) * prior + ROOT_SMOOTHING / k
            node.children.append(self._child(node, s, prior))
        return len(new)

    def _priors(self, node: Node, sets: Sequence[TokenSet]) -> list[float]:
        probs = np.array([s.probability for s in sets], dtype=np.float64)
        priors = probs / probs.sum() if probs.sum() > 0 else np.full(len(sets), 1.0 / len(sets))
        if node is self.root:
            priors = (1 - ROOT_SMOOTHING) * priors + ROOT_SMOOTHING / len(sets)
        return priors.tolist()

    @staticmethod
    def _child(parent: Node, s: TokenSet, prior: float) -> Node:
        return Node(
            tokens=s.tokens,
            prior=prior,
            depth=parent.depth + 1,
            parent=parent,
            probability=s.probability,
            greedy=s.greedy,
            ends_answer=s.ends_answer,
        )

    # ---- backup ------------------------------------------------------------------------------------------

    def backup(self, leaf: Node, value: float, path_embeddings: Sequence[np.ndarray]) -> None:
        """Propagate one self-evaluation from `leaf` to the root.

        `path_embeddings[i]` embeds the text from the i-th node below the root through the leaf and its
        rollout. Every node on the path gets the visit and the value; siblings whose (running mean)
        embedding is nearly the same text's also get a share of it, weighted by their similarity.
        """
        path = leaf.path_from(self.root)
        assert len(path) == len(path_embeddings), "one embedding per node below the root"
        for node, embedding in zip(path, path_embeddings, strict=True):
            node.visits += 1
            node.true_visits += 1
            vector = np.asarray(embedding, dtype=np.float64)
            node.embedding = (
                vector if node.embedding is None else (node.embedding + (vector - node.embedding) / node.true_visits)
            )
            self._share_with_similar_siblings(node, value)
            node.q += (value - node.q) / node.visits
            self.q_min = min(self.q_min, node.q)
            self.q_max = max(self.q_max, node.q)
        self.root.visits += 1
        self.root.true_visits += 1
        self.root.q += (value - self.root.q) / self.root.visits

    def _share_with_similar_siblings(self, node: Node, value: float) -> None:
        s = self.settings
        assert node.parent is not None and node.embedding is not None
        for sibling in node.parent.children:
            if sibling is node or sibling.embedding is None:
                continue
            similarity = _cosine(node.embedding, sibling.embedding)
            if similarity < s.similarity_threshold:
                continue
            weight = s.similarity_weight * similarity
            before = sibling.visits
            sibling.visits += weight
            sibling.q = (sibling.q * before + weight * value) / sibling.visits

    # ---- virtual loss, for several searches at once -----------------------------------------------------

    def add_virtual_loss(self, leaf: Node) -> list[tuple[Node, float, float]]:
        """Count provisional visits valued -1 on `leaf`'s path and the root; returns what `restore` needs.
        Several visits: one would not deter the selection rule, which scores a value of -1 like no visit."""
        saved = []
        for node in [self.root, *leaf.path_from(self.root)]:
            saved.append((node, node.visits, node.q))
            node.q = (node.q * node.visits - VIRTUAL_LOSS_VISITS) / (node.visits + VIRTUAL_LOSS_VISITS)
            node.visits += VIRTUAL_LOSS_VISITS
        return saved

    @staticmethod
    def restore(saved: list[tuple[Node, float, float]]) -> None:
        for node, visits, q in saved:
            node.visits, node.q = visits, q

    # ---- the commit (and the rewind that follows it) -----------------------------------------------------

    def commit(self, child: Node) -> None:
        """Make `child` the new root, keeping its subtree: the next searches restart from the new prefix."""
        assert child.parent is self.root
        child.parent = None
        self.root = child
        k = len(child.children)
        for grandchild in child.children:
            grandchild.prior = (1 - ROOT_SMOOTHING) * grandchild.prior + ROOT_SMOOTHING / k

    def count_nodes(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children)
        return count


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 else 0.0
