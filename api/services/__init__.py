"""The ride application layer: one service per job, each with explicit, typed dependencies.

- :mod:`~api.services.quotes` — upfront fares and the trip's points checked against the region;
- :mod:`~api.services.requests` — ride requests, their handoff to the shards (and retries),
  and the driver's answers to offers (accept, decline);
- :mod:`~api.services.trips` — the trip's steps (arrived, start, complete), cancellation,
  and the sweeps that end rides nobody else will (lost requests, orphaned trips);
- :mod:`~api.services.settlement` — charges, cancellation fees, the unpaid-ride sweep;
- :mod:`~api.services.views` — rides, lists and receipts as clients see them, and who may
  see what.

The routes (``api/ride_routes.py``) and the driver's socket (``api/sockets.py``) parse and
authenticate, then build the typed inputs of :mod:`~api.services.values` and call these.
What the services need from outside is in :mod:`~api.services.ports` (the shards, the
event bus, the surge readings); decisions that need no I/O live in ``dispatch/``
(:mod:`dispatch.fares`, :mod:`dispatch.pricing`, :mod:`dispatch.trips`).
"""
