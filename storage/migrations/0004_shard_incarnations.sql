-- Every start of a shard that an edge gave its stored state to, and when: from then on
-- that incarnation owns the shard, and the ride records of an earlier one (an actor
-- cut off from the cluster that Ray already replaced, still running) made after this
-- time are refused (storage/rides.py: RideStore.apply_records).
CREATE TABLE shard_incarnations (
    region      text NOT NULL,
    shard_id    int NOT NULL,
    incarnation text NOT NULL,
    since       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (region, shard_id, incarnation)
);
