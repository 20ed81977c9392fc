"""Rides end to end: a rider and a driver on two edge processes, real shards, Redis, Postgres.

Each test keeps to its own corner of the city and the premium class, and takes its
drivers offline at the end, so no test's ride is offered to another test's driver.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict

import httpx
import pytest
import websockets

from api import client as proto
from tests.e2e.test_edge import auth, driver_socket, new_driver, recv
from tests.helpers import eventually, scaled

pytestmark = pytest.mark.e2e

SUNSET = (37.7530, -122.4950)
BERNAL = (37.7350, -122.4350)
NOB_HILL = (37.7930, -122.4160)


def key() -> str:
    return f"key-{uuid.uuid4().hex}"


def new_rider() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


class Driver:
    """A driver app: one socket, positions with the wall clock, answers with refs."""

    def __init__(self, ws, sub: str) -> None:
        self.ws, self.sub = ws, sub
        self.ids = proto.CallIds()

    @classmethod
    async def online(
        cls, edge, tokens, at: tuple[float, float], held: tuple[str, ...] = ("available",)
    ) -> Driver:
        """Online at ``at`` once its shard holds it with a status in ``held`` (a driver
        placed next to a waiting ride may be offered it before a poll sees it available)."""
        n, sub = new_driver()
        ws = await driver_socket(edge, tokens("driver", sub))
        d = cls(ws, sub)
        await d.send({"type": "online", "lat": at[0], "lng": at[1], "vehicle_class": "premium"})
        assert (await recv(ws, "status"))["status"] == "online"
        # Online once its shard holds it (claimed, not pending): a ride requested before
        # that could go to another test's driver nearby, and this one would wait in vain.
        async with httpx.AsyncClient(base_url=edge.url, headers=auth(tokens("driver", sub))) as c:
            seen: list[str | None] = []

            async def held_so() -> bool:
                seen.append((await c.get("/v1/drivers/me")).json().get("status"))
                return seen[-1] in held

            try:
                await eventually(held_so)
            except AssertionError as exc:
                statuses = sorted(set(map(str, seen)))
                raise AssertionError(f"driver {sub} never {held}; statuses seen: {statuses}") from exc
        return d

    async def send(self, msg: dict) -> int:
        n, stamped = self.ids.stamp(msg)
        await self.ws.send(proto.encode(stamped, "json"))
        return n

    async def answer(self, msg: dict) -> dict:
        """Send ``msg`` and return the reply that refers to it (ride_status, error, ...)."""
        ref = await self.send(msg)
        deadline = time.monotonic() + scaled(15)
        while True:
            m = await recv(self.ws, timeout_s=max(0.1, deadline - time.monotonic()))
            if self.ids.is_reply(m, ref):
                return m

    async def move(self, lat: float, lng: float) -> None:
        await self.send(proto.location(lat, lng, time.time(), speed=10.0))

    async def holds(self, c: httpx.AsyncClient, token: str, lat: float) -> bool:
        """Whether the driver's shard holds ``lat`` as its latest position."""
        me = (await c.get("/v1/drivers/me", headers=auth(token))).json()
        return me.get("lat") is not None and abs(me["lat"] - lat) < 1e-9

    async def close(self) -> None:
        try:
            await self.send({"type": "offline"})
        finally:
            await self.ws.close()


async def rider_socket(edge, token: str):
    ws = await websockets.connect(f"{edge.ws}/v1/ws/rider", additional_headers=auth(token))
    assert (await recv(ws))["type"] == "welcome"
    return ws


class Inbox:
    """Collects a socket's messages in the background, by type."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.by_type: dict[str, list[dict]] = defaultdict(list)
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = proto.decode(raw)
                self.by_type[msg.get("type")].append(msg)
        except websockets.ConnectionClosed:
            pass

    def statuses(self, ride_id: str) -> list[str]:
        return [m["status"] for m in self.by_type["ride_status"] if m["ride_id"] == ride_id]

    async def close(self) -> None:
        await self.ws.close()
        await self.task


async def fund(c: httpx.AsyncClient, tokens, rider: str, cents: int) -> None:
    r = await c.post(
        f"/v1/admin/riders/{rider}/wallet/top-up",
        json={"amount_cents": cents},
        headers={**auth(tokens("admin", "ops")), "Idempotency-Key": key()},
    )
    assert r.status_code == 200, r.text


async def request(c, token, pickup, dropoff, **extra) -> httpx.Response:
    body = {
        "pickup": {"lat": pickup[0], "lng": pickup[1]},
        "dropoff": {"lat": dropoff[0], "lng": dropoff[1]},
        "vehicle_class": "premium",
        **extra,
    }
    return await c.post("/v1/rides", json=body, headers={**auth(token), "Idempotency-Key": key()})


async def test_a_whole_trip_over_real_sockets(edges, tokens):
    """Quote, request, offer, accept, live positions, pickup, metered drop-off, charge,
    receipt: the rider on edge B, the driver on edge A."""
    a, b = edges
    rider = new_rider()
    rtok = tokens("rider", rider)
    pickup = SUNSET
    dropoff = (SUNSET[0] + 0.009, SUNSET[1])  # 1 km north
    driver = await Driver.online(a, tokens, (pickup[0] - 0.003, pickup[1]))
    inbox = Inbox(await rider_socket(b, rtok))
    try:
        async with httpx.AsyncClient(base_url=b.url) as c:
            await fund(c, tokens, rider, 10_000)
            r = await c.post(
                "/v1/quotes",
                json={
                    "pickup": {"lat": pickup[0], "lng": pickup[1]},
                    "dropoff": {"lat": dropoff[0], "lng": dropoff[1]},
                    "vehicle_class": "premium",
                },
                headers=auth(rtok),
            )
            assert r.status_code == 200, r.text
            quote = r.json()
            assert quote["fare"]["total_cents"] >= 2500  # premium's minimum fare
            assert sum(quote["fare"]["lines"].values()) == quote["fare"]["total_cents"]
            r = await request(c, rtok, pickup, dropoff, quote_id=quote["quote_id"])
            assert r.status_code == 201, r.text
            ride = r.json()
            rid = ride["ride_id"]
            assert (
                ride["status"] == "requested" and ride["fare_estimate_cents"] == quote["fare"]["total_cents"]
            )

            offer = await recv(driver.ws, "offer", timeout_s=15)
            assert offer["ride_id"] == rid and offer["pickup"] == {"lat": pickup[0], "lng": pickup[1]}
            assert offer["expires_at"] > time.time()
            accepted = await driver.answer({"type": "accept", "ride_id": rid, "offer_id": offer["offer_id"]})
            assert accepted["type"] == "ride_status" and accepted["status"] == "accepted", accepted

            # The rider hears of it through edge B and sees the driver approach.
            await eventually(lambda: "accepted" in inbox.statuses(rid))
            acc = next(m for m in inbox.by_type["ride_status"] if m["status"] == "accepted")
            assert acc["driver"]["driver_id"] == driver.sub and acc["driver"]["vehicle_class"] == "premium"
            for i in range(1, 4):
                await driver.move(pickup[0] - 0.003 + i * 0.001, pickup[1])
                await asyncio.sleep(0.6)  # paces the driver: positions a car's time apart
            await eventually(lambda: inbox.by_type["driver_position"])
            pos = inbox.by_type["driver_position"][-1]
            assert pos["ride_id"] == rid and abs(pos["lat"] - pickup[0]) < 0.0035

            assert (await driver.answer({"type": "arrived", "ride_id": rid}))["status"] == "arrived"
            assert (await driver.answer({"type": "start_trip", "ride_id": rid}))["status"] == "in_progress"
            # Five 40 m steps a second apart (a car's pace): 200 m metered.
            for i in range(1, 6):
                await asyncio.sleep(1.0)  # paces the driver: the meter takes only plausible moves
                await driver.move(pickup[0] + i * 0.00036, pickup[1])
            dtok = tokens("driver", driver.sub)
            await eventually(lambda: driver.holds(c, dtok, pickup[0] + 5 * 0.00036))  # the last one is in
            done = await driver.answer({"type": "complete_trip", "ride_id": rid})
            assert done["status"] == "completed", done
            # 200 m is well within the quote's 1.3 km: the rider pays the quote.
            assert done["fare"]["basis"] == "quoted"
            assert done["fare"]["total_cents"] == quote["fare"]["total_cents"]
            assert done["payment"]["status"] == "succeeded"
            await eventually(lambda: "completed" in inbox.statuses(rid))

            r = await c.get(f"/v1/rides/{rid}", headers=auth(rtok))
            final = r.json()
            assert final["status"] == "completed" and final["driver_id"] == driver.sub
            assert final["distance_m"] == pytest.approx(200, abs=10)
            assert final["duration_s"] >= 4.0
            applied = [e["status"] for e in final["events"] if e["applied"]]
            assert applied == ["requested", "offered", "accepted", "arrived", "in_progress", "completed"], (
                final["events"]
            )

            # The receipt's numbers are the ledger's.
            total = quote["fare"]["total_cents"]
            mine = (await c.get(f"/v1/rides/{rid}/receipt", headers=auth(rtok))).json()
            assert mine["totals"]["charged_cents"] == total and mine["totals"]["net_cents"] == total
            assert mine["fare"]["total"] == total
            assert [(x["account"], x["amount_cents"]) for x in mine["ledger"]] == [(f"rider:{rider}", total)]
            full = (await c.get(f"/v1/rides/{rid}/receipt", headers=auth(tokens("admin", "ops")))).json()
            by_txn: dict[str, int] = defaultdict(int)
            for line in full["ledger"]:
                by_txn[line["txn_id"]] += line["amount_cents"]
            assert by_txn and all(v == 0 for v in by_txn.values())
            driver_line = next(x for x in full["ledger"] if x["account"] == f"driver:{driver.sub[4:]}")
            wallet = (await c.get("/v1/riders/me/wallet", headers=auth(rtok))).json()
            assert wallet["balance_cents"] == 10_000 - total
            earn = (await c.get("/v1/drivers/me/earnings", headers=auth(tokens("driver", driver.sub)))).json()
            assert earn["earned_cents"] == -driver_line["amount_cents"] > 0 and earn["trips"] == 1
            # Support refunds 500 cents: into the wallet, driver and platform giving back in
            # proportion; a retry with the key refunds nothing more; another amount is a 422.
            charge = next(p for p in full["payments"] if p["kind"] == "charge")
            admin = auth(tokens("admin", "support-1"))
            k = key()
            url = f"/v1/admin/payments/{charge['payment_id']}/refund"
            body = {"amount_cents": 500, "reason": "long detour"}
            r1 = await c.post(url, json=body, headers={**admin, "Idempotency-Key": k})
            r2 = await c.post(url, json=body, headers={**admin, "Idempotency-Key": k})
            assert r1.status_code == 200 and r2.json() == r1.json(), r1.text
            r3 = await c.post(
                url, json={**body, "amount_cents": 600}, headers={**admin, "Idempotency-Key": k}
            )
            assert r3.status_code == 422 and r3.json()["error"]["code"] == "idempotency_mismatch"
            r = await c.post(
                url,
                json={"amount_cents": 10 * total, "reason": "too much"},
                headers={**admin, "Idempotency-Key": key()},
            )
            assert r.status_code == 422
            after = (await c.get(f"/v1/rides/{rid}/receipt", headers=auth(tokens("admin", "ops")))).json()
            assert after["totals"]["refunded_cents"] == 500 and after["totals"]["net_cents"] == total - 500
            by_txn = defaultdict(int)
            for line in after["ledger"]:
                by_txn[line["txn_id"]] += line["amount_cents"]
            assert len(by_txn) == 2 and all(v == 0 for v in by_txn.values())
            wallet = (await c.get("/v1/riders/me/wallet", headers=auth(rtok))).json()
            assert wallet["balance_cents"] == 10_000 - total + 500
            # Refunds are support's: a rider cannot.
            r = await c.post(url, json=body, headers={**auth(rtok), "Idempotency-Key": key()})
            assert r.status_code == 403
            # Nobody else sees the ride or its receipt.
            other = tokens("rider", new_rider())
            assert (await c.get(f"/v1/rides/{rid}", headers=auth(other))).status_code == 404
            assert (await c.get(f"/v1/rides/{rid}/receipt", headers=auth(other))).status_code == 404
    finally:
        await driver.close()
        await inbox.close()


async def test_a_trip_without_a_quote_is_metered_on_the_driven_distance(edges, tokens):
    a, _ = edges
    rider = new_rider()
    rtok = tokens("rider", rider)
    pickup = (SUNSET[0] - 0.006, SUNSET[1] + 0.004)
    driver = await Driver.online(a, tokens, pickup)
    try:
        async with httpx.AsyncClient(base_url=a.url) as c:
            r = await request(c, rtok, pickup, (pickup[0] + 0.01, pickup[1]), payment_method="cash")
            assert r.status_code == 201, r.text
            rid = r.json()["ride_id"]
            offer = await recv(driver.ws, "offer", timeout_s=15)
            assert offer["ride_id"] == rid
            dtok = tokens("driver", driver.sub)
            # The REST way this time.
            r = await c.post(
                f"/v1/rides/{rid}/accept", json={"offer_id": offer["offer_id"]}, headers=auth(dtok)
            )
            assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
            # The ride as GET shows it (its history may since have one more late record).
            took, got = r.json(), (await c.get(f"/v1/rides/{rid}", headers=auth(dtok))).json()
            assert took["outcome"] is None and took["driver_id"] == driver.sub
            assert {k: v for k, v in took.items() if k != "events"} == {
                k: v for k, v in got.items() if k != "events"
            }
            assert [e for e in took["events"] if e["applied"]] == [e for e in got["events"] if e["applied"]]
            assert [e["event"] for e in took["events"] if e["applied"]][-1] == "accept"
            for step in ("arrived", "start"):
                r = await c.post(f"/v1/rides/{rid}/{step}", headers=auth(dtok))
                assert r.status_code == 200, r.text
            for i in range(1, 4):
                await asyncio.sleep(1.0)  # paces the driver: the meter takes only plausible moves
                await driver.move(pickup[0] + i * 0.0004, pickup[1])
            await eventually(lambda: driver.holds(c, dtok, pickup[0] + 3 * 0.0004))  # the last one is in
            k = key()
            r = await c.post(f"/v1/rides/{rid}/complete", headers={**auth(dtok), "Idempotency-Key": k})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["outcome"]["fare"]["basis"] == "metered"
            assert out["outcome"]["payment"] == {
                "status": "succeeded",
                "method": "cash",
                "failure_reason": None,
            }
            assert out["distance_m"] == pytest.approx(3 * 44.5, abs=10)
            # A retry with the key answers the same, and charges nothing more.
            again = await c.post(f"/v1/rides/{rid}/complete", headers={**auth(dtok), "Idempotency-Key": k})
            assert again.status_code == 200 and again.json() == out
            receipt = (await c.get(f"/v1/rides/{rid}/receipt", headers=auth(tokens("admin", "ops")))).json()
            charges = [p for p in receipt["payments"] if p["kind"] == "charge"]
            assert len(charges) == 1 and charges[0]["amount_cents"] == out["final_fare_cents"]
            # Cash: the driver holds the fare and owes the platform its share.
            cash = next(x for x in receipt["ledger"] if x["account"].startswith("cash:"))
            assert cash["amount_cents"] == out["final_fare_cents"]
            # Without the key, a second completion is an illegal transition.
            r = await c.post(f"/v1/rides/{rid}/complete", headers=auth(dtok))
            assert r.status_code == 409 and r.json()["error"]["code"] == "illegal_transition"
            metrics = (await c.get("/metrics", headers=auth(tokens("admin", "ops")))).text
            prefix = 'dispatch_rides_total{step="completed"}'
            done = [ln for ln in metrics.splitlines() if ln.startswith(prefix)]
            assert done and float(done[0].split()[-1]) >= 1
    finally:
        await driver.close()


async def test_ride_requests_are_idempotent_and_checked(edges, tokens):
    a, b = edges
    rider = new_rider()
    rtok = tokens("rider", rider)
    body = {
        "pickup": {"lat": BERNAL[0], "lng": BERNAL[1]},
        "dropoff": {"lat": BERNAL[0] + 0.01, "lng": BERNAL[1]},
        "vehicle_class": "premium",
    }
    k = key()
    async with httpx.AsyncClient(base_url=a.url) as c, httpx.AsyncClient(base_url=b.url) as cb:
        first = await c.post("/v1/rides", json=body, headers={**auth(rtok), "Idempotency-Key": k})
        assert first.status_code == 201, first.text
        rid = first.json()["ride_id"]
        # The same key through the other edge: the same ride, not a second one.
        again = await cb.post("/v1/rides", json=body, headers={**auth(rtok), "Idempotency-Key": k})
        assert again.status_code == 200 and again.json()["ride_id"] == rid
        other = {**body, "vehicle_class": "xl"}
        r = await c.post("/v1/rides", json=other, headers={**auth(rtok), "Idempotency-Key": k})
        assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_mismatch"
        mine = (await c.get("/v1/rides", headers=auth(rtok))).json()
        assert [x["ride_id"] for x in mine] == [rid]

        bad = [
            ({**body, "pickup": {"lat": "north", "lng": 1}}, 422),
            ({**body, "pickup": {"lat": 95.0, "lng": BERNAL[1]}}, 422),
            ({**body, "pickup": {"lat": 40.7, "lng": -74.0}}, 422),  # New York: outside the area
            ({**body, "dropoff": {"lat": 10.0, "lng": 10.0}}, 422),  # an absurd trip
            ({**body, "vehicle_class": "rocket"}, 422),
            ({**body, "payment_method": "barter"}, 422),
            ({**body, "payment_method": "card"}, 422),  # no card processor configured
            ({**body, "quote_id": "no-such-quote"}, 422),
        ]
        for b_, status in bad:
            r = await c.post("/v1/rides", json=b_, headers={**auth(rtok), "Idempotency-Key": key()})
            assert r.status_code == status, (b_, r.text)
            assert r.json()["error"]["code"] in ("invalid_input", "invalid_location", "validation_error"), (
                r.text
            )
        # NaN is not a coordinate, even where the JSON parser lets it through.
        raw = json.dumps(body).replace(str(BERNAL[0]), "NaN", 1)
        r = await c.post(
            "/v1/rides",
            content=raw,
            headers={**auth(rtok), "Idempotency-Key": key(), "Content-Type": "application/json"},
        )
        assert r.status_code == 422
        r = await c.post("/v1/rides", json=body, headers=auth(rtok))
        assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]["message"]
        # Roles and tokens.
        r = await c.post(
            "/v1/rides", json=body, headers={**auth(tokens("driver", "drv-9")), "Idempotency-Key": k}
        )
        assert r.status_code == 403
        r = await c.post("/v1/rides", json=body, headers={"Idempotency-Key": k})
        assert r.status_code == 401
        # Nothing of the refused requests was stored.
        assert len((await c.get("/v1/rides", headers=auth(rtok))).json()) == 1
        # The rider cancels before any driver: free.
        r = await c.post(f"/v1/rides/{rid}/cancel", json={"reason": "changed my mind"}, headers=auth(rtok))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled" and r.json()["outcome"]["fee"]["charged"] is False
        r = await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
        assert r.status_code == 409 and r.json()["error"]["code"] == "illegal_transition"


async def _accepted_ride(c, tokens, driver: Driver, rtok: str, pickup) -> tuple[str, dict]:
    r = await request(c, rtok, pickup, (pickup[0] + 0.01, pickup[1]))
    assert r.status_code == 201, r.text
    rid = r.json()["ride_id"]
    offer = await recv(driver.ws, "offer", timeout_s=15)
    assert offer["ride_id"] == rid
    acc = await driver.answer({"type": "accept", "ride_id": rid, "offer_id": offer["offer_id"]})
    assert acc["status"] == "accepted", acc
    return rid, offer


async def test_cancellation_at_each_stage(edges, tokens):
    a, _ = edges
    rider = new_rider()
    rtok = tokens("rider", rider)
    pickup = NOB_HILL
    driver = await Driver.online(a, tokens, pickup)
    try:
        async with httpx.AsyncClient(base_url=a.url) as c:
            await fund(c, tokens, rider, 5_000)
            # Offered: the rider cancels, the driver's offer is withdrawn, no fee.
            r = await request(c, rtok, pickup, (pickup[0] + 0.01, pickup[1]))
            rid = r.json()["ride_id"]
            offer = await recv(driver.ws, "offer", timeout_s=15)
            r = await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
            assert r.status_code == 200 and r.json()["outcome"]["fee"]["reason"] == "before_accept"
            gone = await recv(driver.ws, "offer_withdrawn")
            assert gone["offer_id"] == offer["offer_id"] and gone["reason"] == "rider_cancelled"
            late = await driver.answer({"type": "accept", "ride_id": rid, "offer_id": offer["offer_id"]})
            assert late["type"] == "error" and late["code"] in ("offer_unavailable", "not_found"), late

            # Accepted: the rider cancels within the free window; the driver is told and freed.
            rid, _ = await _accepted_ride(c, tokens, driver, rtok, pickup)
            r = await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
            assert r.json()["outcome"]["fee"] == {
                "charged": False,
                "fee_cents": 0,
                "reason": "within_free_window",
            }
            told = await recv(driver.ws, "ride_status")
            assert (
                told["ride_id"] == rid and told["status"] == "cancelled" and told["cancelled_by"] == "rider"
            )

            # Arrived: the rider cancels and pays premium's fee, into the driver's earnings.
            rid, _ = await _accepted_ride(c, tokens, driver, rtok, pickup)
            assert (await driver.answer({"type": "arrived", "ride_id": rid}))["status"] == "arrived"
            r = await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
            out = r.json()["outcome"]
            assert out["fee"] == {"charged": True, "fee_cents": 1500, "reason": "after_arrival"}
            assert out["payment"]["status"] == "succeeded"
            assert (await c.get("/v1/riders/me/wallet", headers=auth(rtok))).json()["balance_cents"] == 3_500
            receipt = (await c.get(f"/v1/rides/{rid}/receipt", headers=auth(rtok))).json()
            assert receipt["totals"]["cancellation_fee_cents"] == 1500

            # Accepted: the driver cancels; the rider is not charged and hears of it.
            inbox = Inbox(await rider_socket(a, rtok))
            rid, _ = await _accepted_ride(c, tokens, driver, rtok, pickup)
            dropped = await driver.answer({"type": "cancel_ride", "ride_id": rid, "reason": "flat tyre"})
            assert dropped["status"] == "cancelled" and dropped["fee"]["reason"] == "cancelled_by_driver"
            await eventually(lambda: "cancelled" in inbox.statuses(rid))
            await inbox.close()

            # In progress: neither may cancel; support may.
            rid, _ = await _accepted_ride(c, tokens, driver, rtok, pickup)
            for step in ("arrived", "start_trip"):
                assert (await driver.answer({"type": step, "ride_id": rid}))["type"] == "ride_status"
            r = await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
            assert r.status_code == 409
            refused = await driver.answer({"type": "cancel_ride", "ride_id": rid})
            assert refused["type"] == "error" and refused["code"] == "illegal_transition"
            r = await c.post(
                f"/v1/rides/{rid}/cancel",
                json={"reason": "safety"},
                headers=auth(tokens("admin", "support-1")),
            )
            assert r.status_code == 200 and r.json()["cancel_by"] == "support"
            # The driver is free again: the next request is offered to it.
            r = await request(c, rtok, pickup, (pickup[0] + 0.01, pickup[1]))
            assert (await recv(driver.ws, "offer", timeout_s=15))["ride_id"] == r.json()["ride_id"]
            await c.post(f"/v1/rides/{r.json()['ride_id']}/cancel", headers=auth(rtok))
    finally:
        await driver.close()


async def test_concurrent_accepts_let_exactly_one_win(edges, tokens):
    a, b = edges
    rtok = tokens("rider", new_rider())
    pickup = (BERNAL[0] - 0.004, BERNAL[1] - 0.01)
    driver = await Driver.online(a, tokens, pickup)
    try:
        async with httpx.AsyncClient(base_url=a.url) as ca, httpx.AsyncClient(base_url=b.url) as cb:
            r = await request(ca, rtok, pickup, (pickup[0] + 0.01, pickup[1]))
            rid = r.json()["ride_id"]
            offer = await recv(driver.ws, "offer", timeout_s=15)
            dtok = tokens("driver", driver.sub)
            # Another driver may not take it.
            _, thief = new_driver()
            r = await ca.post(
                f"/v1/rides/{rid}/accept",
                json={"offer_id": offer["offer_id"]},
                headers=auth(tokens("driver", thief)),
            )
            assert r.status_code in (403, 409), r.text
            # Twelve accepts at once through both edges (a retrying app): exactly one wins.
            answers = await asyncio.gather(
                *(
                    c.post(
                        f"/v1/rides/{rid}/accept", json={"offer_id": offer["offer_id"]}, headers=auth(dtok)
                    )
                    for c in [ca, cb] * 6
                )
            )
            codes = sorted(r.status_code for r in answers)
            assert codes == [200] + [409] * 11, [r.text for r in answers]
            assert {r.json()["error"]["code"] for r in answers if r.status_code == 409} == {
                "offer_unavailable"
            }
            ride = (await ca.get(f"/v1/rides/{rid}", headers=auth(rtok))).json()
            assert ride["status"] == "accepted" and ride["driver_id"] == driver.sub
            assert [e["event"] for e in ride["events"]].count("accept") == 1
            await ca.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
    finally:
        await driver.close()


async def test_a_decline_reaches_postgres_through_the_shards_records(edges, tokens):
    """The shard's own records (here: a decline) are written to Postgres by the edges."""
    a, _ = edges
    rtok = tokens("rider", new_rider())
    pickup = (37.8000, -122.4400)
    driver = await Driver.online(a, tokens, pickup)
    try:
        async with httpx.AsyncClient(base_url=a.url) as c:
            rid = (await request(c, rtok, pickup, (pickup[0] - 0.01, pickup[1]))).json()["ride_id"]
            offer = await recv(driver.ws, "offer", timeout_s=15)
            ack = await driver.answer({"type": "decline", "ride_id": rid, "offer_id": offer["offer_id"]})
            assert ack["type"] == "offer_declined" and ack["offer_id"] == offer["offer_id"]

            async def recorded():
                ride = (await c.get(f"/v1/rides/{rid}", headers=auth(rtok))).json()
                events = [(e["event"], e["applied"]) for e in ride["events"]]
                return ride["status"] == "requested" and ("offer_declined", True) in events and ride

            ride = await eventually(recorded)
            assert [e["event"] for e in ride["events"]] == ["request", "offer", "offer_declined"]
            await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
    finally:
        await driver.close()


async def test_a_restarted_shard_reloads_its_open_rides_from_postgres(edges, tokens, shards, shard_map):
    """Kill the pickup's shard actor with a ride waiting: Ray restarts it empty, an edge
    reloads the ride from Postgres, and the next driver nearby is offered it."""
    import ray

    a, _ = edges
    rtok = tokens("rider", new_rider())
    pickup = (37.7250, -122.4000)
    k = shard_map.shard_for_point(*pickup)
    async with httpx.AsyncClient(base_url=a.url) as c:
        rid = (await request(c, rtok, pickup, (pickup[0] + 0.01, pickup[1]))).json()["ride_id"]
        handle = shards.handle(k)
        before = (await handle.stats.remote())["uptime_s"]
        ray.kill(handle, no_restart=False)
        shards.forget(k)

        async def reloaded():
            try:
                h = shards.handle(k)
                s = await asyncio.wait_for(h.stats.remote(), 5)
            except Exception:
                shards.forget(k)
                return False
            return s["uptime_s"] < before and not s["rides"]["needs_restore"] and s["rides"]["open"] >= 1

        await eventually(reloaded, timeout_s=60, interval_s=0.5)
        driver = await Driver.online(a, tokens, (pickup[0] + 0.002, pickup[1]), held=("available", "offered"))
        try:
            offer = await recv(driver.ws, "offer", timeout_s=20)
            assert offer["ride_id"] == rid
        finally:
            await driver.close()
        r = await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
        assert r.status_code == 200


async def test_an_edge_without_postgres_keeps_ingest_and_answers_503_for_rides(edge_env, tokens, tmp_path):
    """Postgres down: positions and nearby go on; ride routes say 503; readiness says why."""
    from storage.redis_server import free_port
    from tests.fixtures_edge import start_edge

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    edge = start_edge(edge_env, tmp_path, "edge-no-pg", DATABASE_URL=dead)
    try:
        async with httpx.AsyncClient(base_url=edge.url) as c:

            async def up():
                try:
                    return (await c.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(up, timeout_s=60, interval_s=0.3)
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["checks"] == {"shards": True, "redis": True, "postgres": False}
            rtok = tokens("rider", new_rider())
            r = await request(c, rtok, BERNAL, (BERNAL[0] + 0.01, BERNAL[1]))
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            pickup = (BERNAL[0] + 0.004, BERNAL[1] + 0.004)
            driver = await Driver.online(edge, tokens, pickup)
            try:
                await driver.move(pickup[0] + 0.0001, pickup[1])

                async def visible():
                    q = {"lat": pickup[0], "lng": pickup[1], "radius_m": 300, "vehicle_class": "premium"}
                    r = await c.get("/v1/drivers/nearby", params=q, headers=auth(rtok))
                    return r.status_code == 200 and r.json()["count"] >= 1

                await eventually(visible)
                refused = await driver.answer(
                    {"type": "accept", "ride_id": str(uuid.uuid4()), "offer_id": "x:1"}
                )
                assert refused["type"] == "error" and refused["code"] == "unavailable"
            finally:
                await driver.close()
    finally:
        # uvicorn re-raises the SIGTERM it handled, hence -15 for a clean stop too.
        assert edge.stop() in (0, -15) and "Traceback" not in edge.log(), edge.log()


async def test_a_ride_no_shard_holds_is_expired_past_its_maximum_wait(edge_env, pg_pool, tokens, tmp_path):
    """A ride stored but never handed to a shard (its edge died at that moment) does not stay
    open forever: an edge's sweep expires it once past the maximum wait, and tells the rider."""
    from storage.rides import RideStore
    from tests.fixtures_edge import start_edge

    rider = new_rider()
    ride, _ = await RideStore(pg_pool).create_ride(
        rider_id=rider,
        region="sf",
        shard_id=0,
        vehicle_class=2,
        pickup=SUNSET,
        dropoff=(SUNSET[0] + 0.01, SUNSET[1]),
        surge_multiplier=1.0,
        fare_estimate_cents=2500,
        currency="USD",
    )
    async with pg_pool.acquire() as conn:
        await conn.execute(
            "UPDATE rides SET requested_at = now() - interval '1 hour' WHERE ride_id = $1",
            uuid.UUID(ride.ride_id),
        )
    edge = start_edge(edge_env, tmp_path, "edge-sweeper")
    try:
        async with httpx.AsyncClient(base_url=edge.url) as c:

            async def expired():
                try:
                    r = await c.get(f"/v1/rides/{ride.ride_id}", headers=auth(tokens("rider", rider)))
                except httpx.TransportError:
                    return False
                return r.status_code == 200 and r.json()["status"] == "expired" and r.json()

            out = await eventually(expired, timeout_s=60, interval_s=0.5)
            assert out["events"][-1]["actor_role"] == "system"
    finally:
        edge.stop()


async def test_surge_rises_with_demand_and_is_locked_into_the_ride(edges, tokens):
    """Twenty riders and no driver in one zone: the shard's surge feed raises the zone's
    multiplier, quotes show it, and a ride keeps the multiplier it was requested at."""
    a, _ = edges
    spot = (37.7150, -122.4650)  # Lake Merced: a zone no other test uses
    rides = []
    async with httpx.AsyncClient(base_url=a.url) as c:
        for _ in range(20):
            tok = tokens("rider", new_rider())
            r = await request(c, tok, spot, (spot[0] + 0.01, spot[1]))
            assert r.status_code == 201, r.text
            rides.append((tok, r.json()["ride_id"]))
        rtok = tokens("rider", new_rider())
        body = {
            "pickup": {"lat": spot[0], "lng": spot[1]},
            "dropoff": {"lat": spot[0] + 0.01, "lng": spot[1]},
            "vehicle_class": "premium",
        }

        async def surging():
            q = (await c.post("/v1/quotes", json=body, headers=auth(rtok))).json()
            return q["fare"]["surge_multiplier"] > 1.0 and q

        quote = await eventually(surging, timeout_s=30, interval_s=1.0)
        assert quote["fare"]["lines"]["surge"] > 0
        s = (await c.get("/v1/surge", params={"lat": spot[0], "lng": spot[1]}, headers=auth(rtok))).json()
        assert s["multiplier"] >= quote["fare"]["surge_multiplier"] > 1.0
        r = await request(c, rtok, spot, (spot[0] + 0.01, spot[1]), quote_id=quote["quote_id"])
        ride = r.json()
        assert ride["surge_multiplier"] == quote["fare"]["surge_multiplier"]
        assert ride["fare_estimate_cents"] == quote["fare"]["total_cents"]
        for tok, rid in [*rides, (rtok, ride["ride_id"])]:
            assert (await c.post(f"/v1/rides/{rid}/cancel", headers=auth(tok))).status_code == 200


async def test_a_burst_past_the_edges_capacity_gets_503_and_loses_nothing(edge_env, tokens, tmp_path):
    """With room for two ride requests at a time, a burst of twelve: the excess is told to
    retry (503, Retry-After), every 201 is a stored ride, and the retries then succeed."""
    from tests.fixtures_edge import start_edge, wait_ready

    edge = start_edge(edge_env, tmp_path, "edge-small", DISPATCH_RIDE_REQUESTS_IN_FLIGHT="2")
    try:
        wait_ready([edge])
        rtok = tokens("rider", new_rider())
        async with httpx.AsyncClient(base_url=edge.url) as c:
            drop = {"lat": BERNAL[0] + 0.01, "lng": BERNAL[1]}
            body = {
                "pickup": {"lat": BERNAL[0], "lng": BERNAL[1]},
                "dropoff": drop,
                "vehicle_class": "premium",
            }
            keys = [key() for _ in range(12)]
            first = await asyncio.gather(
                *(c.post("/v1/rides", json=body, headers={**auth(rtok), "Idempotency-Key": k}) for k in keys)
            )
            busy = [k for k, r in zip(keys, first, strict=True) if r.status_code == 503]
            assert {r.status_code for r in first} <= {201, 503} and busy, [r.status_code for r in first]
            for r in first:
                if r.status_code == 503:
                    assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "unavailable"
            for k in busy:  # the client retries with the same keys
                r = await c.post("/v1/rides", json=body, headers={**auth(rtok), "Idempotency-Key": k})
                assert r.status_code == 201, r.text
            mine = (await c.get("/v1/rides", headers=auth(rtok))).json()
            assert len(mine) == 12
            for ride in mine:
                assert (
                    await c.post(f"/v1/rides/{ride['ride_id']}/cancel", headers=auth(rtok))
                ).status_code == 200
    finally:
        edge.stop()


async def test_bad_ride_frames_get_clear_errors_and_change_nothing(edges, tokens):
    """Malformed or foreign ride steps on the driver socket are answered with an error, the
    ride is untouched, and the socket goes on to accept the real offer."""
    a, _ = edges
    rtok = tokens("rider", new_rider())
    pickup = (BERNAL[0] + 0.006, BERNAL[1] - 0.012)
    driver = await Driver.online(a, tokens, pickup)
    try:
        async with httpx.AsyncClient(base_url=a.url) as c:
            rid = (await request(c, rtok, pickup, (pickup[0] + 0.01, pickup[1]))).json()["ride_id"]
            offer = await recv(driver.ws, "offer", timeout_s=15)

            async def offered():  # the shard's record of the offer has reached Postgres
                ride = (await c.get(f"/v1/rides/{rid}", headers=auth(rtok))).json()
                return ride["status"] == "offered" and ride

            before = await eventually(offered)
            bad = [
                ({"type": "accept", "offer_id": offer["offer_id"]}, "invalid_field"),  # no ride_id
                ({"type": "accept", "ride_id": 42, "offer_id": offer["offer_id"]}, "invalid_field"),
                ({"type": "accept", "ride_id": rid}, "invalid_field"),  # no offer_id
                ({"type": "accept", "ride_id": str(uuid.uuid4()), "offer_id": "x:1"}, "not_found"),
                ({"type": "accept", "ride_id": rid, "offer_id": f"{uuid.uuid4()}:1"}, "invalid_input"),
                ({"type": "decline", "ride_id": rid, "offer_id": f"{rid}:99"}, "not_found"),
                ({"type": "arrived", "ride_id": rid}, "not_found"),  # not this driver's ride yet
                ({"type": "cancel_ride", "ride_id": rid, "reason": 7}, "invalid_field"),
            ]
            for msg, code in bad:
                answer = await driver.answer(msg)
                assert answer["type"] == "error" and answer["code"] == code, (msg, answer)
            after = (await c.get(f"/v1/rides/{rid}", headers=auth(rtok))).json()
            assert after["version"] == before["version"] and after["driver_id"] is None
            assert after["events"] == before["events"]
            ok = await driver.answer({"type": "accept", "ride_id": rid, "offer_id": offer["offer_id"]})
            assert ok["status"] == "accepted", ok
            await c.post(f"/v1/rides/{rid}/cancel", headers=auth(rtok))
    finally:
        await driver.close()
