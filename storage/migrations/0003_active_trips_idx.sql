-- The orphaned-trip sweep (api/services/trips.py: Trips.end_orphans) asks every half
-- minute for trips under way that have not changed for a while: a small partial index
-- keeps that from scanning every ride ever taken.
CREATE INDEX rides_active_idx ON rides (updated_at) WHERE status IN ('accepted', 'arrived', 'in_progress');
