"""Fingerprints of HTTP requests: what makes two requests under one Idempotency-Key "the same".

Made here, at the API boundary, and handed to storage as opaque strings
(:meth:`storage.idempotency.IdempotencyStore.run`, :meth:`storage.rides.RideStore.create_ride`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def fingerprint(method: str, path: str, body: Mapping[str, Any] | None) -> str:
    """sha256 (hex) of the canonical JSON of a request: method, path, body with sorted keys.

    Two bodies that differ only in key order or whitespace have the same fingerprint.
    Values JSON cannot encode are encoded by ``str()``.
    """
    canonical = json.dumps(
        {"method": method.upper(), "path": path, "body": body if body is not None else {}},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
