-- The system of record: riders, drivers, rides and their append-only history, quotes,
-- idempotency keys, payments, the double-entry ledger and rider wallets.
--
-- Conventions: ids of rides, quotes and payments are uuids made here; rider ids are the
-- opaque strings of the auth layer ("r-1", a JWT subject); driver ids are the engine's
-- integers (dispatch.drivers.parse_driver_id). Money is integer cents. Times are timestamptz.
-- schema_migrations itself is created by storage.db.migrate before this file runs.

CREATE TABLE riders (
    rider_id    text PRIMARY KEY CHECK (length(rider_id) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE drivers (
    driver_id   bigint PRIMARY KEY CHECK (driver_id > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE quotes (
    quote_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    rider_id          text NOT NULL REFERENCES riders,
    region            text NOT NULL,
    vehicle_class     int NOT NULL CHECK (vehicle_class >= 0),
    pickup_lat        double precision NOT NULL,
    pickup_lng        double precision NOT NULL,
    dropoff_lat       double precision NOT NULL,
    dropoff_lng       double precision NOT NULL,
    distance_m        double precision NOT NULL CHECK (distance_m >= 0),
    duration_s        double precision NOT NULL CHECK (duration_s >= 0),
    surge_multiplier  double precision NOT NULL CHECK (surge_multiplier >= 1),
    fare_cents        int NOT NULL CHECK (fare_cents >= 0),
    currency          text NOT NULL,
    breakdown         jsonb NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    used_by_ride      uuid UNIQUE
);

CREATE TABLE rides (
    ride_id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    rider_id             text NOT NULL REFERENCES riders,
    driver_id            bigint REFERENCES drivers,
    region               text NOT NULL,
    shard_id             int NOT NULL CHECK (shard_id >= 0),
    vehicle_class        int NOT NULL CHECK (vehicle_class >= 0),
    pickup_lat           double precision NOT NULL CHECK (pickup_lat BETWEEN -90 AND 90),
    pickup_lng           double precision NOT NULL CHECK (pickup_lng BETWEEN -180 AND 180),
    dropoff_lat          double precision NOT NULL CHECK (dropoff_lat BETWEEN -90 AND 90),
    dropoff_lng          double precision NOT NULL CHECK (dropoff_lng BETWEEN -180 AND 180),
    -- Keep in step with dispatch.trips.RideStatus (an integration test compares them).
    status               text NOT NULL DEFAULT 'requested' CHECK (status IN
                             ('requested', 'offered', 'accepted', 'arrived', 'in_progress',
                              'completed', 'cancelled', 'expired')),
    version              int NOT NULL DEFAULT 1 CHECK (version >= 1),
    quote_id             uuid REFERENCES quotes,
    surge_multiplier     double precision NOT NULL DEFAULT 1 CHECK (surge_multiplier >= 1),
    fare_estimate_cents  int NOT NULL CHECK (fare_estimate_cents >= 0),
    currency             text NOT NULL,
    final_fare_cents     int CHECK (final_fare_cents >= 0),
    distance_m           double precision CHECK (distance_m >= 0),
    duration_s           double precision CHECK (duration_s >= 0),
    cancel_by            text CHECK (cancel_by IN ('rider', 'driver', 'system', 'support')),
    cancel_fee_cents     int CHECK (cancel_fee_cents >= 0),
    -- The rider's Idempotency-Key of the POST that created the ride, and a fingerprint of
    -- that request: a retry with the same key gets this ride back, another body a 422.
    idempotency_key      text,
    request_fingerprint  text,
    requested_at         timestamptz NOT NULL DEFAULT now(),
    accepted_at          timestamptz,
    arrived_at           timestamptz,
    started_at           timestamptz,
    completed_at         timestamptz,
    cancelled_at         timestamptz,
    expired_at           timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (rider_id, idempotency_key)
);

CREATE INDEX rides_rider_requested_idx ON rides (rider_id, requested_at DESC);
CREATE INDEX rides_driver_idx ON rides (driver_id) WHERE driver_id IS NOT NULL;
CREATE INDEX rides_open_idx ON rides (region, shard_id) WHERE status IN ('requested', 'offered');

-- The history of every ride, append-only. An applied event moved the ride to ``status``
-- at ``version``; an event that arrived too late to apply (a shard's offer_expired after
-- the accept) is kept with applied = false and the version the ride had, for support.
CREATE TABLE trip_events (
    id          bigserial PRIMARY KEY,
    ride_id     uuid NOT NULL REFERENCES rides,
    version     int NOT NULL,
    event       text NOT NULL,
    status      text NOT NULL,
    applied     boolean NOT NULL DEFAULT true,
    actor_role  text NOT NULL,
    actor_id    text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    -- Where the event came from when it was replayed from elsewhere (the Redis stream
    -- message id of a shard's record): a second delivery is a no-op.
    source      text UNIQUE,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX trip_events_applied_version_idx ON trip_events (ride_id, version) WHERE applied;
CREATE INDEX trip_events_ride_idx ON trip_events (ride_id, id);

-- Responses of POSTs made with an Idempotency-Key. status_code IS NULL while the first
-- request still runs (a reservation); scope names who and what ("rider:r-1:POST /v1/rides").
CREATE TABLE idempotency_keys (
    scope        text NOT NULL,
    key          text NOT NULL,
    fingerprint  text NOT NULL,
    status_code  int,
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    PRIMARY KEY (scope, key)
);

CREATE TABLE payments (
    payment_id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    ride_id            uuid REFERENCES rides,
    rider_id           text NOT NULL REFERENCES riders,
    kind               text NOT NULL CHECK (kind IN ('charge', 'refund', 'cancellation_fee', 'top_up')),
    amount_cents       bigint NOT NULL CHECK (amount_cents > 0),
    currency           text NOT NULL,
    method             text NOT NULL CHECK (method IN ('wallet', 'cash', 'card')),
    provider           text NOT NULL,
    provider_ref       text,
    status             text NOT NULL CHECK (status IN ('succeeded', 'failed')),
    failure_reason     text,
    refund_of          uuid REFERENCES payments,
    breakdown          jsonb NOT NULL DEFAULT '{}',
    fingerprint        text NOT NULL,
    idempotency_scope  text NOT NULL,
    idempotency_key    text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (idempotency_scope, idempotency_key),
    CHECK ((status = 'failed') = (failure_reason IS NOT NULL)),
    CHECK ((kind = 'refund') = (refund_of IS NOT NULL))
);

-- A ride is charged its fare at most once and its cancellation fee at most once, whatever
-- the keys of the attempts (a failed attempt does not count).
CREATE UNIQUE INDEX payments_once_per_ride_idx ON payments (ride_id, kind)
    WHERE status = 'succeeded' AND kind IN ('charge', 'cancellation_fee');
CREATE INDEX payments_ride_idx ON payments (ride_id);

-- Double entry: amount_cents > 0 debits the account, < 0 credits it (dispatch.ledger).
-- The entries of one txn_id sum to zero, checked at commit by the trigger below.
CREATE TABLE ledger_entries (
    id            bigserial PRIMARY KEY,
    txn_id        uuid NOT NULL,
    payment_id    uuid NOT NULL REFERENCES payments,
    -- Which posting of the payment: a card charge is a funding posting (card to wallet)
    -- and a charge posting (wallet to driver and platform); refunds undo the charge one.
    posting       text NOT NULL CHECK (posting IN ('charge', 'funding', 'refund', 'cancellation_fee', 'top_up')),
    account       text NOT NULL CHECK (account LIKE '%:%'),
    amount_cents  bigint NOT NULL CHECK (amount_cents <> 0),
    currency      text NOT NULL,
    ride_id       uuid REFERENCES rides,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_account_idx ON ledger_entries (account, created_at);
CREATE INDEX ledger_txn_idx ON ledger_entries (txn_id);
CREATE INDEX ledger_ride_idx ON ledger_entries (ride_id) WHERE ride_id IS NOT NULL;

-- The rider's stored balance: what the platform owes the rider, equal to minus the sum of
-- the ledger's rider:<id> account. Never negative: a wallet payment without the funds fails.
CREATE TABLE wallets (
    rider_id       text PRIMARY KEY REFERENCES riders,
    balance_cents  bigint NOT NULL DEFAULT 0 CHECK (balance_cents >= 0),
    currency       text NOT NULL DEFAULT 'USD',
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION ledger_txn_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total bigint;
BEGIN
    SELECT coalesce(sum(amount_cents), 0) INTO total FROM ledger_entries WHERE txn_id = NEW.txn_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger txn % is unbalanced: entries sum to % cents', NEW.txn_id, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_txn_balanced AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_txn_balanced();

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER trip_events_append_only BEFORE UPDATE OR DELETE ON trip_events
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
