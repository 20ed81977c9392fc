"""The one test of "a real number" the core and storage share.

JSON and msgpack hand us ints, floats, booleans (which Python counts as ints) and
non-finite floats alike; a position, a fare input or a timestamp must be none of the
last two. Validation at the edges (pydantic at REST, ``api/protocol.py`` on sockets)
uses the same rule.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard


def is_finite_number(v: Any) -> TypeGuard[int | float]:
    """True for an int or float that is finite and not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def finite_or_none(v: Any) -> float | None:
    """``v`` as a float if :func:`is_finite_number`, else None."""
    return float(v) if is_finite_number(v) else None
