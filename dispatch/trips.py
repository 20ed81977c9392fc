"""The trip state machine and the cancellation-fee rules, Sans-I/O.

::

    requested ─offer─► offered ─accept─► accepted ─arrive─► arrived ─start─► in_progress ─complete─► completed
        ▲                 │
        └─offer_declined──┤
        └─offer_expired───┘
    requested, offered ──expire──► expired
    any open status ──cancel──► cancelled   (who may cancel depends on the status, see below)

Who may cause what:

- ``offer``, ``offer_expired``, ``expire``: the system (the shard's matching loop).
- ``offer_declined``, ``accept``, ``arrive``, ``start``, ``complete``: the driver.
- ``cancel``: the rider from requested, offered, accepted or arrived; the driver from
  accepted or arrived; support from any status that is not final (including
  in_progress, which no rider or driver may cancel: a trip under way ends by completing
  it); the system from accepted, arrived or in_progress when the trip's driver was lost
  (silent past ``[trips] orphan_after_s``; see :class:`TripRules`).

Every transition not in :data:`TRANSITIONS` raises :class:`~dispatch.errors.IllegalTransition`,
whose ``detail`` carries ``status``, ``event`` and ``role`` for the edge's error body.
The final statuses (completed, cancelled, expired) have no way out.

A driver's cancellation ends the ride (status cancelled). Matching the rider again is a
new ride request, created by whoever holds the rider's intent (the edge), so that every
ride row has one driver at most and one history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from dispatch.errors import ConfigError, IllegalTransition, InvalidInput


class RideStatus(StrEnum):
    REQUESTED = "requested"
    OFFERED = "offered"
    ACCEPTED = "accepted"
    ARRIVED = "arrived"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({RideStatus.COMPLETED, RideStatus.CANCELLED, RideStatus.EXPIRED})


class TripEvent(StrEnum):
    OFFER = "offer"
    OFFER_DECLINED = "offer_declined"
    OFFER_EXPIRED = "offer_expired"
    ACCEPT = "accept"
    ARRIVE = "arrive"
    START = "start"
    COMPLETE = "complete"
    CANCEL = "cancel"
    EXPIRE = "expire"


class ActorRole(StrEnum):
    RIDER = "rider"
    DRIVER = "driver"
    SYSTEM = "system"  # the shard itself: matching, offer timeouts, request expiry
    SUPPORT = "support"  # support agents and admins


@dataclass(frozen=True, slots=True)
class Transition:
    """One legal edge of the state machine: where it leads and who may take it."""

    target: RideStatus
    roles: frozenset[ActorRole]


def _t(target: RideStatus, *roles: ActorRole) -> Transition:
    return Transition(target, frozenset(roles))


_S, _E, _R = RideStatus, TripEvent, ActorRole

#: (status, event) -> Transition. Anything absent is illegal.
TRANSITIONS: Mapping[tuple[RideStatus, TripEvent], Transition] = MappingProxyType(
    {
        (_S.REQUESTED, _E.OFFER): _t(_S.OFFERED, _R.SYSTEM),
        (_S.REQUESTED, _E.EXPIRE): _t(_S.EXPIRED, _R.SYSTEM),
        (_S.REQUESTED, _E.CANCEL): _t(_S.CANCELLED, _R.RIDER, _R.SUPPORT),
        (_S.OFFERED, _E.OFFER_DECLINED): _t(_S.REQUESTED, _R.DRIVER),
        (_S.OFFERED, _E.OFFER_EXPIRED): _t(_S.REQUESTED, _R.SYSTEM),
        (_S.OFFERED, _E.ACCEPT): _t(_S.ACCEPTED, _R.DRIVER),
        (_S.OFFERED, _E.EXPIRE): _t(_S.EXPIRED, _R.SYSTEM),
        (_S.OFFERED, _E.CANCEL): _t(_S.CANCELLED, _R.RIDER, _R.SUPPORT),
        (_S.ACCEPTED, _E.ARRIVE): _t(_S.ARRIVED, _R.DRIVER),
        (_S.ACCEPTED, _E.CANCEL): _t(_S.CANCELLED, _R.RIDER, _R.DRIVER, _R.SUPPORT, _R.SYSTEM),
        (_S.ARRIVED, _E.START): _t(_S.IN_PROGRESS, _R.DRIVER),
        (_S.ARRIVED, _E.CANCEL): _t(_S.CANCELLED, _R.RIDER, _R.DRIVER, _R.SUPPORT, _R.SYSTEM),
        (_S.IN_PROGRESS, _E.COMPLETE): _t(_S.COMPLETED, _R.DRIVER),
        (_S.IN_PROGRESS, _E.CANCEL): _t(_S.CANCELLED, _R.SUPPORT, _R.SYSTEM),
    }
)


def _coerce(enum: type[StrEnum], value: Any, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise InvalidInput(
            f"unknown {what} {value!r}; expected one of {[m.value for m in enum]}", **{what: value}
        ) from None


def next_status(current: RideStatus | str, event: TripEvent | str, actor_role: ActorRole | str) -> RideStatus:
    """The status a ride moves to when ``actor_role`` causes ``event`` in ``current``.

    Accepts the enums or their string values. Raises :class:`InvalidInput` for a value
    that names no status, event or role, and :class:`IllegalTransition` when the event
    is not allowed in ``current`` or not for this role. Pure: changes nothing.
    """
    status = _coerce(RideStatus, current, "status")
    ev = _coerce(TripEvent, event, "event")
    role = _coerce(ActorRole, actor_role, "role")
    edge = TRANSITIONS.get((status, ev))
    detail = {"status": status.value, "event": ev.value, "role": role.value}
    if edge is None:
        if status.is_final:
            msg = f"the ride is already {status.value}; nothing can {ev.value} it"
        else:
            allowed = sorted(e.value for (s, e) in TRANSITIONS if s == status)
            msg = f"cannot {ev.value} a ride that is {status.value} (allowed: {', '.join(allowed)})"
        raise IllegalTransition(msg, **detail)
    if role not in edge.roles:
        who = ", ".join(sorted(r.value for r in edge.roles))
        raise IllegalTransition(
            f"a {role.value} cannot {ev.value} a ride that is {status.value} (only: {who})", **detail
        )
    return edge.target


def allowed_events(current: RideStatus | str, actor_role: ActorRole | str) -> frozenset[TripEvent]:
    """The events ``actor_role`` may cause in ``current`` (for clients' button states)."""
    status = _coerce(RideStatus, current, "status")
    role = _coerce(ActorRole, actor_role, "role")
    return frozenset(e for (s, e), t in TRANSITIONS.items() if s == status and role in t.roles)


# --- cancellation fees --------------------------------------------------------------


class FeeReason(StrEnum):
    """Why a cancellation was or was not charged: a stable code for receipts and support."""

    BEFORE_ACCEPT = "before_accept"  # no driver had committed yet: free
    WITHIN_FREE_WINDOW = "within_free_window"  # rider changed their mind quickly: free
    DRIVER_LATE = "driver_late"  # the driver ran well past the promised pickup: free
    CANCELLED_BY_DRIVER = "cancelled_by_driver"  # never the rider's fault: free
    CANCELLED_BY_SUPPORT = "cancelled_by_support"  # support settles money by refunds, not fees
    AFTER_FREE_WINDOW = "after_free_window"  # charged
    AFTER_ARRIVAL = "after_arrival"  # the driver was already waiting at the pickup: charged


@dataclass(frozen=True, slots=True)
class CancellationFee:
    """The fee decision for one cancellation. ``fee_cents`` is 0 when not ``charged``."""

    charged: bool
    fee_cents: int
    reason: FeeReason


@dataclass(frozen=True, slots=True)
class CancellationPolicy:
    """When a rider's cancellation costs a fee.

    - Before a driver accepted (requested, offered): free.
    - After acceptance, the rider has ``free_cancel_window_s`` to change their mind.
      Past it, the fee applies: the driver has been driving to the pickup.
    - Once the driver has arrived, the fee applies whatever the window.
    - Unless the driver is late: if the rider was promised a pickup time and the driver
      has not arrived ``driver_late_grace_s`` after it, cancelling is free (the usual
      "your driver is running late" rule). Without a promised time this rule is off.
    - A driver's or support's cancellation never charges the rider.

    The amount is the vehicle class's ``FareRules.cancellation_fee_cents``, passed in.
    """

    free_cancel_window_s: float = 120.0
    driver_late_grace_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("free_cancel_window_s", "driver_late_grace_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"cancellation.{name} must be a finite number >= 0, got {v!r}")

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> CancellationPolicy:
        """Build from a region's ``[cancellation]`` table; missing keys keep the defaults."""
        unknown = set(section) - {"free_cancel_window_s", "driver_late_grace_s"}
        if unknown:
            raise ConfigError(f"cancellation: unknown keys {sorted(unknown)}")
        try:
            return cls(**{k: float(v) for k, v in section.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cancellation: {exc}") from None

    def fee(
        self,
        status: RideStatus | str,
        cancelled_by: ActorRole | str,
        now: float,
        fee_cents: int,
        accepted_at: float | None = None,
        arrived_at: float | None = None,
        promised_pickup_at: float | None = None,
    ) -> CancellationFee:
        """Decide the fee for cancelling a ride that is in ``status`` at ``now``.

        ``status`` is the status *before* the cancellation. ``accepted_at`` is required
        for accepted and arrived rides, ``arrived_at`` for arrived ones; timestamps must
        not lie after ``now``. Raises :class:`IllegalTransition` if ``cancelled_by`` may not
        cancel in ``status`` (so a fee is never computed for an impossible cancellation),
        and :class:`InvalidInput` for missing or inconsistent timestamps or a negative fee.
        """
        st = _coerce(RideStatus, status, "status")
        role = _coerce(ActorRole, cancelled_by, "role")
        next_status(st, TripEvent.CANCEL, role)  # raises if this role may not cancel now
        if not (isinstance(fee_cents, int) and fee_cents >= 0):
            raise InvalidInput(f"fee_cents must be an integer >= 0, got {fee_cents!r}")

        def free(reason: FeeReason) -> CancellationFee:
            return CancellationFee(False, 0, reason)

        if role is ActorRole.DRIVER:
            return free(FeeReason.CANCELLED_BY_DRIVER)
        if role is ActorRole.SUPPORT:
            return free(FeeReason.CANCELLED_BY_SUPPORT)
        if st in (RideStatus.REQUESTED, RideStatus.OFFERED):
            return free(FeeReason.BEFORE_ACCEPT)
        # The rider cancels an accepted or arrived ride.
        if accepted_at is None or not math.isfinite(accepted_at) or accepted_at > now:
            raise InvalidInput(f"accepted_at must be a time at or before now for a {st.value} ride")
        if st is RideStatus.ARRIVED:
            if arrived_at is None or not math.isfinite(arrived_at) or not accepted_at <= arrived_at <= now:
                raise InvalidInput("arrived_at must lie between accepted_at and now for an arrived ride")
            return CancellationFee(fee_cents > 0, fee_cents, FeeReason.AFTER_ARRIVAL)
        if promised_pickup_at is not None and now > promised_pickup_at + self.driver_late_grace_s:
            return free(FeeReason.DRIVER_LATE)
        if now - accepted_at <= self.free_cancel_window_s:
            return free(FeeReason.WITHIN_FREE_WINDOW)
        return CancellationFee(fee_cents > 0, fee_cents, FeeReason.AFTER_FREE_WINDOW)


# A slots dataclass has no class attribute holding the default, so from_section reads it here.
_ORPHAN_AFTER_S = 600.0


@dataclass(frozen=True, slots=True)
class TripRules:
    """A region's rules for trips under way, from its ``[trips]`` section.

    ``orphan_after_s``: a trip (accepted, arrived or in progress) whose driver has sent
    nothing for this long is ended by the server (cancelled by the system, reason
    ``driver_lost``). Ten minutes by default: longer than a tunnel, a dead phone battery
    swapped or an app restarted, short enough that a stranded rider is released the same
    hour. It must exceed ``[drivers] stale_after_s``.
    """

    orphan_after_s: float = _ORPHAN_AFTER_S

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> TripRules:
        unknown = set(section) - {"orphan_after_s"}
        if unknown:
            raise ConfigError(f"unknown [trips] keys: {sorted(unknown)}")
        v = section.get("orphan_after_s", _ORPHAN_AFTER_S)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"[trips] orphan_after_s must be a number of seconds > 0, got {v!r}")
        return cls(orphan_after_s=float(v))
