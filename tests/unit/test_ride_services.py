"""The ride application layer (api/services) over in-memory fakes: no Ray, no Postgres."""

from __future__ import annotations

import asyncio
import time

import pytest

from api.auth import Principal, Role
from api.rides import RideService
from api.services.values import Point, RideRequestInput
from dispatch.errors import IdempotencyMismatch, NotFound, OfferUnavailable
from dispatch.fares import DistanceSource, orphan_charge, trip_measure
from dispatch.region import load_region
from dispatch.shardmap import ShardMap
from dispatch.trips import ActorRole, RideStatus, TripEvent
from dispatch.vocabulary import MessageType, StatusReason
from tests.unit.ride_fakes import FakePayments, FakePublisher, FakeQuoteStore, FakeRideStore, FakeShards

PICKUP, DROPOFF = Point(37.7793, -122.4193), Point(37.7897, -122.4000)
RIDER = Principal("r-1", Role.RIDER)
OTHER_RIDER = Principal("r-2", Role.RIDER)
DRIVER = Principal("drv-7", Role.DRIVER, driver_id=7)
OTHER_DRIVER = Principal("drv-8", Role.DRIVER, driver_id=8)
ADMIN = Principal("ops", Role.ADMIN)


class World:
    def __init__(self) -> None:
        region = load_region()
        self.store, self.shards, self.bus = FakeRideStore(), FakeShards(), FakePublisher()
        self.payments = FakePayments()
        svc = RideService(
            pool=None,
            region=region,
            shard_map=ShardMap(region),
            shards=self.shards,
            surge=None,
            redis_url=None,
            max_in_flight=4,
        )
        # The same wiring, with the fakes in place of Postgres and Redis.
        for part in (svc.views, svc.settlement, svc.requests, svc.offers, svc.trips):
            part.rides = self.store
        svc.views.payments = svc.settlement.payments = self.payments
        svc.trips.quotes = FakeQuoteStore()
        svc.offers.publisher = svc.trips.publisher = self.bus
        self.svc = svc
        self.orphan_after_s = region.trip_rules().orphan_after_s

    def request(
        self, key: str = "k-1", rider: Principal = RIDER, fingerprint: str = "fp-1"
    ) -> RideRequestInput:
        return RideRequestInput(rider.sub, PICKUP, DROPOFF, "standard", None, "wallet", key, fingerprint)

    async def accepted_ride(self):
        ride, _ = await self.svc.requests.request_ride(self.request())
        offer_id = self.shards.offer(ride.ride_id, 7)
        return await self.svc.offers.accept(DRIVER, ride.ride_id, offer_id)


def run(coro):
    return asyncio.run(coro)


def test_request_accept_steps_complete_and_settle():
    async def go():
        w = World()
        ride, created = await w.svc.requests.request_ride(w.request())
        assert created and ride.status is RideStatus.REQUESTED
        assert ride.ride_id in w.shards.queued  # handed to its shard after it was stored
        offer_id = w.shards.offer(ride.ride_id, 7)
        ride = await w.svc.offers.accept(DRIVER, ride.ride_id, offer_id)
        assert (ride.status, ride.driver_id) == (RideStatus.ACCEPTED, 7)
        told = w.bus.to("rider", "r-1")
        assert told[-1]["type"] == MessageType.RIDE_STATUS and told[-1]["status"] == "accepted"
        w.shards.held[7] = {"ts": time.time(), "trip": {"ride_id": ride.ride_id, "odometer_m": 100.0}}
        for step in (TripEvent.ARRIVE, TripEvent.START):
            ride, _ = await w.svc.trips.advance(DRIVER, ride.ride_id, step)
        w.shards.held[7]["trip"]["odometer_m"] = 2100.0
        ride, extra = await w.svc.trips.advance(DRIVER, ride.ride_id, TripEvent.COMPLETE)
        assert ride.status is RideStatus.COMPLETED and 7 in w.shards.freed
        assert ride.distance_m == 2000.0  # the odometer's difference between start and drop-off
        assert extra["payment"]["status"] == "succeeded"
        [charge] = w.payments.by_key.values()
        assert charge.amount_cents == ride.final_fare_cents == extra["fare"]["total_cents"] > 0
        # The settlement sweep finds nothing more to charge; a second settle is the same payment.
        assert await w.svc.settlement.settle(ride, None) is charge
        assert len(w.payments.by_key) == 1

    run(go())


def test_the_same_key_and_request_is_the_same_ride_and_another_request_is_refused():
    async def go():
        w = World()
        first, created = await w.svc.requests.request_ride(w.request())
        again, created_again = await w.svc.requests.request_ride(w.request())
        assert created and not created_again and again.ride_id == first.ride_id
        with pytest.raises(IdempotencyMismatch):
            await w.svc.requests.request_ride(w.request(fingerprint="fp-other"))
        assert len(w.store.rides) == 1

    run(go())


def test_a_rider_sees_only_its_rides_and_others_are_told_there_is_none():
    async def go():
        w = World()
        ride, _ = await w.svc.requests.request_ride(w.request())
        assert (await w.svc.views.get(RIDER, ride.ride_id))["ride_id"] == ride.ride_id
        assert (await w.svc.views.get(ADMIN, ride.ride_id))["ride_id"] == ride.ride_id
        for stranger in (OTHER_RIDER, DRIVER):
            with pytest.raises(NotFound):
                await w.svc.views.get(stranger, ride.ride_id)
            with pytest.raises(NotFound):
                await w.svc.views.receipt(stranger, ride.ride_id)
        with pytest.raises(NotFound):
            await w.svc.trips.cancel(OTHER_RIDER, ride.ride_id)
        assert w.store.rides[ride.ride_id].status is RideStatus.REQUESTED

    run(go())


def test_a_driver_acts_only_as_itself():
    async def go():
        w = World()
        ride = await w.accepted_ride()
        with pytest.raises(NotFound):  # another driver's trip does not exist for it
            await w.svc.trips.advance(OTHER_DRIVER, ride.ride_id, TripEvent.ARRIVE)
        assert w.store.rides[ride.ride_id].version == ride.version

    run(go())


def test_accepting_another_drivers_offer_is_offer_unavailable_whoever_asks():
    async def go():
        w = World()
        ride, _ = await w.svc.requests.request_ride(w.request())
        offer_id = w.shards.offer(ride.ride_id, 7)
        with pytest.raises(OfferUnavailable):
            await w.svc.offers.accept(OTHER_DRIVER, ride.ride_id, offer_id)
        with pytest.raises(OfferUnavailable):
            await w.svc.offers.decline(OTHER_DRIVER, ride.ride_id, offer_id)
        # The offer is still the offered driver's to take.
        assert (await w.svc.offers.accept(DRIVER, ride.ride_id, offer_id)).driver_id == 7

    run(go())


def test_an_accept_postgres_could_not_store_frees_the_driver_and_reopens_the_ride_in_its_shard():
    """The shard took the ride out of its queue when it granted the accept; a plain handoff
    would be a no-op there (a late handoff must not reopen a ride a driver took), so the
    ride goes back with ``reopen``, and keeps it when that handoff must be retried."""
    from dispatch.errors import Unavailable

    async def go():
        w = World()
        ride, _ = await w.svc.requests.request_ride(w.request())
        assert w.shards.reopened == []
        offer_id = w.shards.offer(ride.ride_id, 7)
        stored = w.store.transition

        async def down(*args, **kwargs):
            raise Unavailable("Postgres unavailable")

        w.store.transition = down
        shards_hand_over = w.shards.hand_over

        async def shard_down(*args, **kwargs):
            raise Unavailable("shard unavailable")

        w.shards.hand_over = shard_down
        with pytest.raises(Unavailable):
            await w.svc.offers.accept(DRIVER, ride.ride_id, offer_id)
        assert w.shards.freed == [7]
        assert ride.ride_id in w.svc.requests.pending_handoffs
        # The retry, once the shard answers, reopens it too.
        w.store.transition = stored
        w.shards.hand_over = shards_hand_over
        assert await w.svc.requests.retry_handoffs() == 1
        assert w.shards.reopened == [ride.ride_id]
        assert not w.svc.requests.pending_handoffs

    run(go())


def test_an_offer_id_naming_its_shard_is_answered_without_reading_the_ride():
    """A shard actor's offer id names the shard (dispatch/rides.py: offer_shard): the answer
    goes there straight, and the accept is stored without a read of the ride first."""

    async def go():
        w = World()
        ride, _ = await w.svc.requests.request_ride(w.request())
        reads: list[str] = []
        get = w.store.get

        async def counted_get(ride_id):
            reads.append(ride_id)
            return await get(ride_id)

        await w.store.transition(ride.ride_id, TripEvent.OFFER, ActorRole.SYSTEM, "shard")
        w.store.get = counted_get
        declined = w.shards.offer(ride.ride_id, 8, shard_id=3)
        await w.svc.offers.decline(OTHER_DRIVER, ride.ride_id, declined)
        accepted = await w.svc.offers.accept(
            DRIVER, ride.ride_id, w.shards.offer(ride.ride_id, 7, shard_id=3)
        )
        assert (accepted.status, accepted.driver_id) == (RideStatus.ACCEPTED, 7)
        assert w.shards.asked == [3, 3] and reads == []
        # An id naming a shard the region does not have, or none, is routed by the ride.
        other, _ = await w.svc.requests.request_ride(w.request(key="k-2"))
        with pytest.raises(OfferUnavailable):
            await w.svc.offers.accept(DRIVER, other.ride_id, f"{other.ride_id}:999.inc-1")
        assert reads == [other.ride_id] and w.shards.asked[-1] == other.shard_id

    run(go())


def test_an_accept_postgres_could_not_store_without_the_ride_in_hand_reopens_it_once_it_answers():
    from dispatch.errors import Unavailable

    async def go():
        w = World()
        ride, _ = await w.svc.requests.request_ride(w.request())
        offer_id = w.shards.offer(ride.ride_id, 7, shard_id=ride.shard_id)
        stored = w.store.transition

        async def down(*args, **kwargs):
            raise Unavailable("Postgres unavailable")

        w.store.transition = down
        with pytest.raises(Unavailable):
            await w.svc.offers.accept(DRIVER, ride.ride_id, offer_id)
        assert w.shards.freed == [7]
        assert ride.ride_id in w.svc.requests.pending_handoffs and w.shards.reopened == []
        w.store.transition = stored
        assert await w.svc.requests.retry_handoffs() == 1
        assert w.shards.reopened == [ride.ride_id]
        assert not w.svc.requests.pending_handoffs

    run(go())


@pytest.mark.parametrize("steps", [(), (TripEvent.ARRIVE,), (TripEvent.ARRIVE, TripEvent.START)])
def test_a_trip_whose_driver_went_silent_is_ended_free_and_the_rider_told(steps):
    async def go():
        w = World()
        ride = await w.accepted_ride()
        for step in steps:
            ride, _ = await w.svc.trips.advance(DRIVER, ride.ride_id, step)
        # Still reporting: left alone.
        w.shards.held[7] = {"ts": time.time()}
        assert await w.svc.end_orphans() == 0
        # Silent past the limit (or no shard holds it any more): ended by the server.
        w.shards.held[7] = {"ts": time.time() - w.orphan_after_s - 5}
        assert await w.svc.end_orphans() == 1
        ended = w.store.rides[ride.ride_id]
        assert ended.status is RideStatus.CANCELLED and ended.cancel_by == "system"
        assert ended.cancel_fee_cents == 0 and not w.payments.by_key  # nothing charged
        last = w.bus.to("rider", "r-1")[-1]
        assert (last["status"], last["reason"]) == ("cancelled", StatusReason.DRIVER_LOST)
        assert w.bus.to("driver", 7)[-1]["reason"] == StatusReason.DRIVER_LOST
        assert 7 in w.shards.freed
        assert await w.svc.end_orphans() == 0  # once

    run(go())


def test_a_driver_no_shard_holds_counts_as_silent():
    async def go():
        w = World()
        ride = await w.accepted_ride()
        w.shards.held.pop(7, None)
        assert await w.svc.end_orphans() == 1
        assert w.store.rides[ride.ride_id].status is RideStatus.CANCELLED

    run(go())


def test_the_trip_measure_falls_back_to_the_route_estimate_without_a_whole_odometer():
    kw = {"pickup": PICKUP.pair(), "dropoff": DROPOFF.pair(), "now": 1000.0, "speed_mps": 8.0}
    metered = trip_measure(start_odometer_m=100.0, end_odometer_m=1600.0, started_at=400.0, **kw)
    assert (metered.distance_m, metered.duration_s, metered.source) == (
        1500.0,
        600.0,
        DistanceSource.ODOMETER,
    )
    for start, end in ((None, 1600.0), (100.0, None), (900.0, 10.0), (float("nan"), 5.0)):
        m = trip_measure(start_odometer_m=start, end_odometer_m=end, started_at=None, **kw)
        assert m.source is DistanceSource.ESTIMATE and m.distance_m > 1000 and m.duration_s == 0.0


def test_a_lost_driver_never_costs_the_rider():
    for status in (RideStatus.ACCEPTED, RideStatus.ARRIVED, RideStatus.IN_PROGRESS):
        assert orphan_charge(status) == 0
    with pytest.raises(ValueError):
        orphan_charge(RideStatus.REQUESTED)
