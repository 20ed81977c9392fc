"""Assigning open requests to drivers: optimal batch matching and the greedy baseline.

A shard collects, on each tick, the open requests and for each the candidate drivers its
spatial index found (ids and straight-line distances). :func:`build_cost_matrix` turns
those lists into one dense matrix of pickup ETAs over the union of the candidates, with
``inf`` where a driver is not a candidate of a request. :func:`assign` then solves it:

- ``MatchPolicy.BATCH``: the optimal assignment. It first maximises the number of
  requests that get a feasible driver, then, among those assignments, minimises the sum
  of pickup ETAs (scipy's ``linear_sum_assignment``, a Jonker-Volgenant solver). This is
  the batch matching the large operators run: a driver who is second-nearest to two
  requests can serve the one that has nobody else.
- ``MatchPolicy.GREEDY``: the usual baseline. Requests in row order (the caller passes
  them oldest first) each take their nearest still-free driver.

There is no fairness term in the cost: long-waiting requests are favoured by the ride
book instead (they get a wider search radius, hence more candidates), which keeps the
objective a plain sum of ETAs that a rider can be told. Ties are broken deterministically
(the lower column, i.e. the lower driver id, in greedy; scipy's fixed order in batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment

from dispatch.errors import InvalidInput
from dispatch.geo import eta_s


class MatchPolicy(StrEnum):
    BATCH = "batch"
    GREEDY = "greedy"


def _check_cost(cost_s: ArrayLike) -> NDArray[np.float64]:
    cost = np.asarray(cost_s, dtype=np.float64)
    if cost.ndim != 2:
        raise InvalidInput(f"cost matrix must be 2-D (requests x drivers), got shape {cost.shape}")
    if np.isnan(cost).any() or (cost < 0).any():
        raise InvalidInput("cost matrix entries must be >= 0 or +inf (infeasible); found NaN or negative")
    return cost


def assign(cost_s: ArrayLike, policy: MatchPolicy | str = MatchPolicy.BATCH) -> list[tuple[int, int]]:
    """Pairs ``(request_row, driver_col)`` for a cost matrix of pickup times.

    ``cost_s`` is ``n_requests x n_drivers`` (any shape, rectangular or empty) of
    non-negative seconds, ``np.inf`` where the pair is infeasible. Each row and each
    column appears in at most one pair, and no pair is infeasible. Pairs come sorted by
    row. Raises :class:`InvalidInput` for a non-2-D matrix, NaN or negative entries, or
    an unknown policy.
    """
    cost = _check_cost(cost_s)
    try:
        policy = MatchPolicy(policy)
    except ValueError:
        raise InvalidInput(f"unknown match policy {policy!r}; expected batch or greedy") from None
    if cost.size == 0:
        return []
    if policy is MatchPolicy.GREEDY:
        return _greedy(cost)
    return _batch(cost)


def _batch(cost: NDArray[np.float64]) -> list[tuple[int, int]]:
    feasible = np.isfinite(cost)
    # Rows and columns with no feasible entry can only ever hit the sentinel: leave them
    # out, which shrinks the problem and keeps the sentinel's magnitude modest.
    rows = np.flatnonzero(feasible.any(axis=1))
    cols = np.flatnonzero(feasible.any(axis=0))
    if not len(rows):
        return []
    sub = cost[np.ix_(rows, cols)]
    finite = np.isfinite(sub)
    # The sentinel must outweigh any difference in total finite cost between two
    # assignments, so that one more feasible pair always beats a cheaper total: the
    # solver then maximises the number of feasible pairs first and the ETA sum second.
    k = min(sub.shape)
    sentinel = (float(sub[finite].max()) + 1.0) * (k + 1)
    work = np.where(finite, sub, sentinel)
    r, c = linear_sum_assignment(work)
    keep = finite[r, c]
    return [(int(rows[i]), int(cols[j])) for i, j in zip(r[keep], c[keep], strict=True)]


def _greedy(cost: NDArray[np.float64]) -> list[tuple[int, int]]:
    free = np.ones(cost.shape[1], dtype=bool)
    pairs: list[tuple[int, int]] = []
    for i in range(cost.shape[0]):
        row = np.where(free, cost[i], np.inf)
        j = int(np.argmin(row))  # argmin takes the first (lowest) column on ties
        if np.isfinite(row[j]):
            pairs.append((i, j))
            free[j] = False
    return pairs


def total_cost(cost_s: ArrayLike, pairs: Sequence[tuple[int, int]]) -> float:
    """Sum of the costs of ``pairs`` (a benchmark's and a test's yardstick)."""
    cost = np.asarray(cost_s, dtype=np.float64)
    return float(sum(cost[i, j] for i, j in pairs))


# --- the cost matrix a shard builds -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """One assignment: the request's row (its index in the caller's list) and its driver."""

    row: int
    driver_id: int
    pickup_eta_s: float


@dataclass(frozen=True, slots=True)
class CostMatrix:
    """Pickup ETAs of requests (rows, in the caller's order) over candidate drivers.

    ``driver_ids[j]`` is the driver of column ``j``; columns are sorted by driver id.
    ``cost_s[i, j]`` is ``inf`` when driver ``j`` was not a candidate of request ``i``.
    """

    cost_s: NDArray[np.float64]
    driver_ids: NDArray[np.int64]

    @property
    def shape(self) -> tuple[int, int]:
        return self.cost_s.shape

    def assign(self, policy: MatchPolicy | str = MatchPolicy.BATCH) -> list[Match]:
        """Solve the matrix with ``policy`` and name the drivers (see :func:`assign`)."""
        pairs = assign(self.cost_s, policy)
        return [Match(i, int(self.driver_ids[j]), float(self.cost_s[i, j])) for i, j in pairs]


def build_cost_matrix(
    candidate_ids: Sequence[Sequence[int] | NDArray[np.int64]],
    candidate_distances_m: Sequence[Sequence[float] | NDArray[np.float64]],
    speed_mps: float,
    detour_factor: float = 1.35,
) -> CostMatrix:
    """The dense pickup-ETA matrix for requests and the candidates found for each.

    ``candidate_ids[i]`` and ``candidate_distances_m[i]`` are the ids of the drivers the
    spatial index found for request ``i`` and their straight-line distances in metres
    (as ``Shard.nearby`` returns them). The ETA is :func:`dispatch.geo.eta_s` at
    ``speed_mps`` with ``detour_factor``. A driver listed twice for one request keeps its
    smaller distance. Requests with no candidates are rows of ``inf``. Vectorized: one
    ``np.unique`` over all candidates, no Python loop over pairs.

    Raises :class:`InvalidInput` if the two sequences differ in length, a request's ids
    and distances differ in length, or a distance is negative or not finite.
    """
    n = len(candidate_ids)
    if len(candidate_distances_m) != n:
        raise InvalidInput(
            f"{n} candidate id lists but {len(candidate_distances_m)} distance lists; need one per request"
        )
    ids_parts = [np.asarray(x, dtype=np.int64).reshape(-1) for x in candidate_ids]
    dist_parts = [np.asarray(x, dtype=np.float64).reshape(-1) for x in candidate_distances_m]
    for i, (a, b) in enumerate(zip(ids_parts, dist_parts, strict=True)):
        if len(a) != len(b):
            raise InvalidInput(f"request {i}: {len(a)} candidate ids but {len(b)} distances")
    counts = np.fromiter((len(a) for a in ids_parts), dtype=np.int64, count=n)
    all_ids = np.concatenate(ids_parts) if n else np.empty(0, dtype=np.int64)
    all_dist = np.concatenate(dist_parts) if n else np.empty(0, dtype=np.float64)
    if not np.isfinite(all_dist).all() or (all_dist < 0).any():
        raise InvalidInput("candidate distances must be finite and >= 0")
    driver_ids, cols = np.unique(all_ids, return_inverse=True)
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    cost = np.full((n, len(driver_ids)), np.inf)
    np.minimum.at(cost, (rows, cols), eta_s(all_dist, speed_mps, detour_factor))
    return CostMatrix(cost, driver_ids)
