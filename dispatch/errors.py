"""The one exception tree of the dispatch engine.

::

    DispatchError
    ├── ConfigError(DispatchError, ValueError)      a region or settings file is wrong
    ├── InvalidInput(DispatchError, ValueError)     a client sent something we refuse
    │   ├── InvalidLocation                         non-finite, out of range, outside the region
    │   └── RadiusTooLarge                          a query wider than the shard halo
    ├── NotFound(DispatchError, LookupError)        unknown driver, ride, quote, shard
    ├── Conflict(DispatchError)                     the state forbids it right now
    │   ├── IllegalTransition                       a trip cannot go from A to B
    │   ├── OfferUnavailable                        the offer expired, was taken or declined
    │   ├── DriverUnavailable                       the driver is offline, offered or on a trip
    │   └── IdempotencyMismatch                     same Idempotency-Key, different request
    ├── Forbidden(DispatchError, PermissionError)   the caller may not act on this object
    └── Unavailable(DispatchError)                  a dependency (shard, Postgres, Redis) is down

The core raises these; ``storage/`` translates driver errors into them and ``api/``
translates them into HTTP statuses and WebSocket error messages (never the reverse).
Every error carries a stable machine-readable ``code``.
"""

from __future__ import annotations


class DispatchError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "dispatch_error"

    def __init__(self, message: str = "", **detail: object) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.detail = detail


class ConfigError(DispatchError, ValueError):
    code = "config_error"


class InvalidInput(DispatchError, ValueError):
    code = "invalid_input"


class InvalidLocation(InvalidInput):
    code = "invalid_location"


class RadiusTooLarge(InvalidInput):
    code = "radius_too_large"


class NotFound(DispatchError, LookupError):
    code = "not_found"


class Conflict(DispatchError):
    code = "conflict"


class IllegalTransition(Conflict):
    code = "illegal_transition"


class OfferUnavailable(Conflict):
    code = "offer_unavailable"


class DriverUnavailable(Conflict):
    code = "driver_unavailable"


class IdempotencyMismatch(Conflict):
    code = "idempotency_mismatch"


class Forbidden(DispatchError, PermissionError):
    code = "forbidden"


class Unavailable(DispatchError):
    code = "unavailable"
