"""Batch assignment is optimal (checked by brute force), greedy is the row-order baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dispatch.errors import InvalidInput
from dispatch.geo import eta_s
from dispatch.matching import MatchPolicy, assign, build_cost_matrix, total_cost

INF = np.inf


def brute_force_best(cost: np.ndarray) -> tuple[int, float]:
    """(most feasible pairs, least total cost among those) over every partial assignment."""
    n, m = cost.shape
    best = (0, 0.0)
    # Each row takes a distinct column or none (-1): all injective partial maps.
    for choice in itertools.product(range(-1, m), repeat=n):
        cols = [c for c in choice if c >= 0]
        if len(cols) != len(set(cols)):
            continue
        if any(c >= 0 and not np.isfinite(cost[i, c]) for i, c in enumerate(choice)):
            continue
        total = float(sum(cost[i, c] for i, c in enumerate(choice) if c >= 0))
        if (len(cols), -total) > (best[0], -best[1]):
            best = (len(cols), total)
    return best


def check_valid(cost: np.ndarray, pairs: list[tuple[int, int]]) -> None:
    rows = [i for i, _ in pairs]
    cols = [j for _, j in pairs]
    assert len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
    assert all(np.isfinite(cost[i, j]) for i, j in pairs)
    assert rows == sorted(rows)


@pytest.mark.parametrize("seed", range(30))
def test_batch_is_optimal_on_square_matrices_by_all_permutations(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    cost = rng.uniform(0, 600, (n, n)).round(1)
    best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    pairs = assign(cost, MatchPolicy.BATCH)
    check_valid(cost, pairs)
    assert len(pairs) == n
    assert total_cost(cost, pairs) == pytest.approx(best, abs=1e-9)
    # Greedy is never better than the optimum.
    assert total_cost(cost, assign(cost, MatchPolicy.GREEDY)) >= best - 1e-9


cost_matrices = st.tuples(st.integers(0, 5), st.integers(0, 5)).flatmap(
    lambda shape: hnp.arrays(
        np.float64,
        shape,
        elements=st.one_of(
            st.just(INF), st.floats(0, 900, allow_nan=False), st.sampled_from([0.0, 5.0, 5.0])
        ),
    )
)


@settings(max_examples=300, deadline=None)
@given(cost=cost_matrices)
def test_batch_maximises_feasible_pairs_then_minimises_cost(cost):
    pairs = assign(cost, "batch")
    check_valid(cost, pairs)
    n_best, cost_best = brute_force_best(cost)
    assert len(pairs) == n_best
    assert total_cost(cost, pairs) == pytest.approx(cost_best, rel=1e-9, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(cost=cost_matrices)
def test_greedy_gives_each_row_in_order_its_nearest_free_driver(cost):
    pairs = assign(cost, MatchPolicy.GREEDY)
    check_valid(cost, pairs)
    taken: set[int] = set()
    got = dict(pairs)
    for i in range(cost.shape[0]):
        free = [j for j in range(cost.shape[1]) if j not in taken and np.isfinite(cost[i, j])]
        if not free:
            assert i not in got
            continue
        nearest = min(free, key=lambda j: (cost[i, j], j))
        assert got[i] == nearest
        taken.add(nearest)


def test_greedy_is_worse_on_the_classic_scenario():
    # Request 0 and request 1 both have driver 0 nearest; driver 1 is close to request 0
    # only. Greedy gives driver 0 to request 0 and sends driver 1 across town.
    cost = np.array([[60.0, 90.0], [60.0, 900.0]])
    greedy = assign(cost, MatchPolicy.GREEDY)
    batch = assign(cost, MatchPolicy.BATCH)
    assert greedy == [(0, 0), (1, 1)] and total_cost(cost, greedy) == 960.0
    assert batch == [(0, 1), (1, 0)] and total_cost(cost, batch) == 150.0


def test_greedy_strands_a_request_that_batch_serves():
    cost = np.array([[60.0, 90.0], [60.0, INF]])
    assert assign(cost, "greedy") == [(0, 0)]
    assert assign(cost, "batch") == [(0, 1), (1, 0)]


def test_rectangular_more_requests_than_drivers():
    cost = np.array([[10.0, 50.0], [20.0, 5.0], [1.0, 100.0]])
    pairs = assign(cost, "batch")
    assert pairs == [(1, 1), (2, 0)]  # 6 s in total; requests 0 waits for the next tick


def test_rectangular_more_drivers_than_requests():
    cost = np.array([[30.0, 10.0, 20.0, 5.0]])
    assert assign(cost, "batch") == [(0, 3)]
    assert assign(cost, "greedy") == [(0, 3)]


def test_infeasible_rows_and_columns_are_left_out():
    cost = np.array([[INF, INF, INF], [INF, 7.0, INF], [INF, INF, INF]])
    assert assign(cost, "batch") == [(1, 1)]
    assert assign(np.full((3, 2), INF), "batch") == []
    assert assign(np.empty((0, 4)), "batch") == [] and assign(np.empty((3, 0)), "greedy") == []


def test_feasible_pairs_win_over_a_cheaper_total():
    # One cheap pair (0-0, 1 s) or two dear ones (0-1 and 1-0, 1000 s each): serve both.
    cost = np.array([[1.0, 1000.0], [1000.0, INF]])
    assert assign(cost, "batch") == [(0, 1), (1, 0)]


def test_large_costs_do_not_lose_precision_against_the_sentinel():
    rng = np.random.default_rng(7)
    cost = rng.uniform(0, 1e6, (6, 6))
    cost[rng.random((6, 6)) < 0.3] = INF
    pairs = assign(cost, "batch")
    n_best, best = brute_force_best(cost)
    assert len(pairs) == n_best and total_cost(cost, pairs) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize(
    "bad",
    [np.array([1.0, 2.0]), np.array([[1.0, np.nan]]), np.array([[1.0, -1.0]]), np.array([[-INF, 1.0]])],
)
def test_bad_matrices_are_refused(bad):
    with pytest.raises(InvalidInput):
        assign(bad, "batch")


def test_unknown_policy_is_refused():
    with pytest.raises(InvalidInput, match="policy"):
        assign(np.ones((2, 2)), "auction")


# --- build_cost_matrix --------------------------------------------------------------


def test_cost_matrix_over_the_union_of_candidates():
    cm = build_cost_matrix(
        candidate_ids=[[42, 7], [7], [], [99, 42, 42]],
        candidate_distances_m=[[800.0, 400.0], [100.0], [], [50.0, 900.0, 300.0]],
        speed_mps=8.0,
    )
    assert cm.driver_ids.tolist() == [7, 42, 99]
    assert cm.shape == (4, 3)
    expected = np.full((4, 3), INF)
    expected[0, 0], expected[0, 1] = eta_s(400.0, 8.0), eta_s(800.0, 8.0)
    expected[1, 0] = eta_s(100.0, 8.0)
    expected[3, 1], expected[3, 2] = eta_s(300.0, 8.0), eta_s(50.0, 8.0)  # duplicate 42 keeps 300 m
    np.testing.assert_allclose(cm.cost_s, expected)
    assert expected[1, 0] == pytest.approx(100.0 * 1.35 / 8.0)


def test_cost_matrix_assign_names_drivers_and_etas():
    cm = build_cost_matrix(
        [[1, 2], [1]], [np.array([100.0, 150.0]), np.array([120.0])], speed_mps=10.0, detour_factor=1.0
    )
    batch = cm.assign("batch")
    assert [(m.row, m.driver_id) for m in batch] == [(0, 2), (1, 1)]
    assert [m.pickup_eta_s for m in batch] == pytest.approx([15.0, 12.0])
    greedy = cm.assign(MatchPolicy.GREEDY)
    assert [(m.row, m.driver_id) for m in greedy] == [(0, 1)]


def test_cost_matrix_with_no_requests_or_no_candidates():
    assert build_cost_matrix([], [], 8.0).shape == (0, 0)
    cm = build_cost_matrix([[], []], [[], []], 8.0)
    assert cm.shape == (2, 0) and cm.assign() == []


@pytest.mark.parametrize(
    ("ids", "dists"),
    [([[1]], []), ([[1, 2]], [[10.0]]), ([[1]], [[-5.0]]), ([[1]], [[np.nan]]), ([[1]], [[INF]])],
)
def test_cost_matrix_refuses_inconsistent_input(ids, dists):
    with pytest.raises(InvalidInput):
        build_cost_matrix(ids, dists, 8.0)
