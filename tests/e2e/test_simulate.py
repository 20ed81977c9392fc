"""The city simulation through a real edge: driver sockets, gateway batches, rider REST
and sockets, real shards, Redis and Postgres. What ``dispatch simulate`` does, small.

The city keeps to the Inner Richmond (no other test works there) and the standard class,
and its clean-up leaves no ride open and no driver online for the tests that follow.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from api.client import TERMINAL
from api.simulate import EdgeTransport, drive
from dispatch.city import City
from dispatch.geo import M_PER_DEG_LAT
from dispatch.pricing import DEFAULT_DETOUR_FACTOR
from dispatch.rides import MatchingConfig
from tests.e2e.test_edge import auth
from tests.fixtures_edge import JWT_SECRET
from tests.helpers import eventually, scaled

pytestmark = pytest.mark.e2e

INNER_RICHMOND = (37.7820, -122.4700)
FIRST_DRIVER = 6_100_000


def small_city(region, shard_map) -> City:
    """30 drivers within a few hundred metres; riders ask for short rides right next to
    them, so trips run from request to drop-off in about 15 s."""
    city = City(
        region,
        shard_map,
        drivers=30,
        requests_per_min=90,
        report_interval_s=1.0,
        seed=11,
        first_driver_id=FIRST_DRIVER,
    )
    rng = np.random.default_rng(3)
    f = city.fleet
    f.lat[:] = INNER_RICHMOND[0] + rng.normal(0, 250, f.n) / M_PER_DEG_LAT
    f.lng[:] = INNER_RICHMOND[1] + rng.normal(0, 250, f.n) / f.proj.m_per_deg_lng
    f.speed[:] = rng.uniform(8.0, 12.0, f.n)
    city.answer_delay_s = (0.2, 0.8)
    original = city.new_requests

    def next_to_drivers(dt_s: float, now: float) -> list[dict]:
        rides = original(dt_s, now)
        for r in rides:
            j = int(rng.integers(f.n))
            r["pickup_lat"], r["pickup_lng"] = float(f.lat[j]) + 60 / M_PER_DEG_LAT, float(f.lng[j])
            r["dropoff_lat"], r["dropoff_lng"] = r["pickup_lat"] + 0.0007, r["pickup_lng"]  # 78 m north
        return rides

    city.new_requests = next_to_drivers  # type: ignore[method-assign]
    return city


async def test_a_small_city_rides_through_the_real_edge(edges, tokens, region, shard_map, monkeypatch):
    import dispatch.city

    monkeypatch.setattr(dispatch.city, "BOARDING_S", 2.0)
    a = edges[0]
    city = small_city(region, shard_map)
    # Ten rider sockets at most: the riders past them poll their ride over REST.
    transport = EdgeTransport(
        a.url, JWT_SECRET, city.fleet.ids, city.summary, max_rider_sockets=10, poll_s=2.0
    )
    s = await drive(city, transport, scaled(22.0))
    got = s.as_dict()

    assert len(transport.links) == 30 and not transport.riders  # every rider socket closed
    assert transport.rides_polled > 0
    assert s.requests >= 10, got
    assert s.offered >= 0.8 * s.requests and s.match_latency.total >= 0.8 * s.requests, got
    assert s.accepted >= 0.5 * s.requests, got
    assert s.arrived >= 1 and s.completed >= 1, got
    assert s.payments == {"succeeded": s.completed}  # cash: every completed ride is paid
    # Every accepted offer went to a driver the search could reach: within the largest radius, so
    # its ETA is at most that radius driven (ETA figures themselves are the benchmarks').
    m = MatchingConfig.from_section(region.section("matching"))
    farthest_eta_s = m.max_radius_m * DEFAULT_DETOUR_FACTOR / m.pickup_speed_mps
    assert len(s.pickup_eta_s) == s.accepted, got  # every accepted offer carried its ETA
    assert all(0 <= e <= farthest_eta_s for e in s.pickup_eta_s), s.pickup_eta_s
    unexpected = {k: v for k, v in s.errors.items() if k != "offer_for_unknown_ride"}
    assert not unexpected, s.errors

    async with httpx.AsyncClient(base_url=a.url) as c:
        rid, rider_token = transport.rides_completed[0]
        ride = (await c.get(f"/v1/rides/{rid}", headers=auth(rider_token))).json()
        assert ride["status"] == "completed" and ride["payment_method"] == "cash"
        assert FIRST_DRIVER <= int(ride["driver_id"].removeprefix("drv-")) < FIRST_DRIVER + 30
        assert [e["status"] for e in ride["events"]][-4:] == [
            "accepted",
            "arrived",
            "in_progress",
            "completed",
        ]
        receipt = (await c.get(f"/v1/rides/{rid}/receipt", headers=auth(rider_token))).json()
        charges = [p for p in receipt["payments"] if p["kind"] == "charge"]
        assert len(charges) == 1 and charges[0]["status"] == "succeeded"
        assert charges[0]["amount_cents"] == ride["final_fare_cents"] > 0

        # The clean-up ended every ride of the run and took every driver offline.
        for rid, (_sub, token) in transport._rider_of.items():
            r = await c.get(f"/v1/rides/{rid}", headers=auth(token))
            assert r.json()["status"] in TERMINAL, r.json()

        async def none_of_ours_nearby() -> bool:
            lat, lng = INNER_RICHMOND
            query = {"lat": lat, "lng": lng, "radius_m": 2000, "limit": 100}
            r = await c.get("/v1/drivers/nearby", params=query, headers=auth(tokens("admin", "ops")))
            assert r.status_code == 200, r.text
            ours = [d for d in r.json()["drivers"] if d["driver_id"].startswith("drv-61")]
            return not ours

        await eventually(none_of_ours_nearby)
