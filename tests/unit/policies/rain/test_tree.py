"""policies.rain.tree: the search tree's rules on hand-made nodes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refine_server.policies.rain.tree import SearchTree, TokenSet, TreeSettings


def _tree_with_children(probabilities: list[float]) -> SearchTree:
    tree = SearchTree(TreeSettings())
    tree.expand(tree.root, [TokenSet((i,), p) for i, p in enumerate(probabilities)])
    return tree


def test_root_priors_are_normalised_then_smoothed_towards_uniform() -> None:
    tree = _tree_with_children([0.6, 0.2, 0.2])
    priors = [c.prior for c in tree.root.children]
    assert priors == pytest.approx([0.75 * 0.6 + 0.25 / 3, 0.75 * 0.2 + 0.25 / 3, 0.75 * 0.2 + 0.25 / 3])
    assert sum(priors) == pytest.approx(1.0)
    grandchildren = [TokenSet((7,), 0.3), TokenSet((8,), 0.1)]
    tree.expand(tree.root.children[0], grandchildren)
    assert [c.prior for c in tree.root.children[0].children] == pytest.approx([0.75, 0.25])  # no smoothing


def test_selection_explores_by_prior_first_then_exploits_value() -> None:
    tree = _tree_with_children([0.7, 0.3])
    tree.root.visits = 1
    assert tree.select_child(tree.root).tokens == (0,)  # unvisited: the prior decides
    likely, unlikely = tree.root.children
    tree.backup(likely, -1.0, [np.array([1.0, 0.0])])
    tree.backup(unlikely, 1.0, [np.array([0.0, 1.0])])
    # q_hat = (q + 1) / 2 over the [-1, 1] range: the judged-good child wins despite its smaller prior.
    assert tree.score(unlikely) > tree.score(likely)
    assert tree.select_child(tree.root) is unlikely


def test_backup_updates_every_node_on_the_path_and_the_root() -> None:
    tree = _tree_with_children([0.5, 0.5])
    child = tree.root.children[0]
    tree.expand(child, [TokenSet((5, 6), 1.0)])
    leaf = child.children[0]
    tree.backup(leaf, 1.0, [np.array([1.0, 0.0]), np.array([0.0, 1.0])])
    tree.backup(leaf, 0.0, [np.array([1.0, 0.0]), np.array([0.0, 1.0])])
    for node in (tree.root, child, leaf):
        assert node.true_visits == 2 and node.visits == 2
        assert node.q == pytest.approx(0.5)
    assert tree.root.children[1].visits == 0


def test_near_identical_siblings_share_the_value_weighted_by_similarity() -> None:
    tree = _tree_with_children([0.5, 0.3, 0.2])
    a, b, c = tree.root.children
    tree.backup(b, 0.0, [np.array([1.0, 0.0])])
    tree.backup(c, 0.0, [np.array([0.0, 1.0])])
    tree.backup(a, 1.0, [np.array([1.0, 0.01])])  # cosine with b ~ 1.0, with c ~ 0.01
    similarity = (1.0 * 1.0) / math.hypot(1.0, 0.01)
    weight = 0.2 * similarity
    assert b.visits == pytest.approx(1 + weight)
    assert b.q == pytest.approx(weight * 1.0 / (1 + weight))
    assert b.true_visits == 1
    assert (c.visits, c.q) == (1, 0.0)


def test_widening_wants_alike_children_that_are_all_judged_bad() -> None:
    tree = _tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    tree.backup(a, -1.0, [np.array([1.0, 0.0])])
    assert not tree.wants_widening(tree.root, 1)  # b has no embedding yet
    tree.backup(b, -1.0, [np.array([1.0, 0.001])])
    assert tree.wants_widening(tree.root, 1)
    tree.backup(b, 1.0, [np.array([1.0, 0.001])])
    assert not tree.wants_widening(tree.root, 1)  # b is no longer bad
    added = tree.add_children(tree.root, [TokenSet((0,), 0.4), TokenSet((9,), 0.2)])
    assert added == 1 and tree.root.children[-1].tokens == (9,)


def test_commit_keeps_the_subtree_and_smooths_the_new_root_priors() -> None:
    tree = _tree_with_children([0.9, 0.1])
    chosen = tree.root.children[0]
    tree.expand(chosen, [TokenSet((3,), 0.8), TokenSet((4,), 0.2)])
    tree.backup(chosen.children[0], 1.0, [np.array([1.0]), np.array([1.0])])
    tree.commit(chosen)
    assert tree.root is chosen and chosen.parent is None
    assert [c.prior for c in chosen.children] == pytest.approx([0.75 * 0.8 + 0.125, 0.75 * 0.2 + 0.125])
    assert chosen.children[0].true_visits == 1  # the subtree's statistics survive the rewind


def test_most_visited_child_breaks_ties_by_value() -> None:
    tree = _tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    a.visits = b.visits = 3
    a.q, b.q = 0.1, 0.4
    assert tree.root.most_visited_child() is b


def test_widening_reads_the_sample_variance_of_the_children_and_never_widens_one_child() -> None:
    """As torch.var in the official code: divided by N - 1. Two children 0.3 apart have a population variance
    norm of 0.0225 (below the 0.03 per token threshold) but a sample variance norm of 0.045 (above it)."""
    tree = _tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    tree.backup(a, -1.0, [np.array([0.0, 0.0])])
    tree.backup(b, -1.0, [np.array([0.3, 0.0])])
    assert not tree.wants_widening(tree.root, 1)
    assert tree.wants_widening(tree.root, 2)  # the threshold grows with the level's set length
    lone = _tree_with_children([1.0])
    lone.backup(lone.root.children[0], -1.0, [np.array([1.0, 0.0])])
    assert not lone.wants_widening(lone.root, 10)
