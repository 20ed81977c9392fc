"""Upfront fare quotes in Postgres (``quotes``).

The edge prices a trip with :func:`dispatch.pricing.make_quote` and saves it here; the
rider's ride request may then name the quote (``RideStore.create_ride(quote_id=...)``),
which checks it and marks it used by that ride, once.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from dispatch.errors import InvalidInput
from dispatch.pricing import Quote
from storage.db import connection, transaction


@dataclass(frozen=True, slots=True)
class StoredQuote:
    """A quote as stored. ``fare_cents`` is the total the rider was quoted."""

    quote_id: str
    rider_id: str
    region: str
    vehicle_class: int
    pickup_lat: float
    pickup_lng: float
    dropoff_lat: float
    dropoff_lng: float
    distance_m: float
    duration_s: float
    surge_multiplier: float
    fare_cents: int
    currency: str
    breakdown: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    used_by_ride: str | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> StoredQuote:
        d = dict(row)
        d["quote_id"] = str(d["quote_id"])
        d["used_by_ride"] = str(d["used_by_ride"]) if d["used_by_ride"] is not None else None
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        d["expires_at"] = self.expires_at.isoformat()
        return d


def _epoch(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class QuoteStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def save(
        self,
        rider_id: str,
        region: str,
        pickup: tuple[float, float],
        dropoff: tuple[float, float],
        quote: Quote,
    ) -> StoredQuote:
        """Store ``quote`` for ``rider_id``; its times (epoch seconds) become timestamps."""
        if not (isinstance(rider_id, str) and rider_id):
            raise InvalidInput("rider_id must be a non-empty string")
        fare = quote.fare
        breakdown = {**fare.lines(), "total": fare.total_cents, "basis": fare.basis.value}
        async with transaction(self.pool) as conn:
            await conn.execute("INSERT INTO riders (rider_id) VALUES ($1) ON CONFLICT DO NOTHING", rider_id)
            row = await conn.fetchrow(
                "INSERT INTO quotes (rider_id, region, vehicle_class, pickup_lat, pickup_lng, dropoff_lat,"
                " dropoff_lng, distance_m, duration_s, surge_multiplier, fare_cents, currency, breakdown,"
                " created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING *",
                rider_id,
                region,
                int(quote.vehicle_class),
                float(pickup[0]),
                float(pickup[1]),
                float(dropoff[0]),
                float(dropoff[1]),
                fare.distance_m,
                fare.duration_s,
                fare.surge_multiplier,
                fare.total_cents,
                fare.currency,
                breakdown,
                _epoch(quote.issued_at),
                _epoch(quote.expires_at),
            )
        assert row is not None  # INSERT ... RETURNING always returns the inserted row
        return StoredQuote.from_row(row)

    async def get(self, quote_id: str) -> StoredQuote | None:
        """The quote, or None (also for a malformed id)."""
        try:
            qid = uuid.UUID(str(quote_id))
        except ValueError:
            return None
        async with connection(self.pool) as conn:
            row = await conn.fetchrow("SELECT * FROM quotes WHERE quote_id = $1", qid)
        return StoredQuote.from_row(row) if row is not None else None
