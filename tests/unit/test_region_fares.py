"""The region's [fares.*], [cancellation] and [surge] tables: loaded, validated at load time."""

from __future__ import annotations

import copy
import tomllib

import pytest

from dispatch.errors import ConfigError
from dispatch.pricing import quote_fare
from dispatch.region import load_region, region_file_text, region_from_dict


def _shipped() -> dict:
    return tomllib.loads(region_file_text())


def test_the_shipped_region_has_fares_for_every_class_and_loads_them():
    region = load_region()
    schedule = region.fare_schedule()
    names = region.drivers.vehicle_classes
    assert len(schedule.by_class) == len(names)
    standard, xl, premium = (
        schedule.for_class(region.vehicle_class_id(n)) for n in ("standard", "xl", "premium")
    )
    assert {r.currency for r in schedule.by_class} == {"USD"}
    # Dearer classes cost more on every metered component and the minimum.
    for a, b in ((standard, xl), (xl, premium)):
        assert a.base_cents < b.base_cents and a.per_km_cents < b.per_km_cents
        assert a.per_min_cents < b.per_min_cents and a.minimum_cents < b.minimum_cents
    # A 5 km, 15 minute ride across the city: $17.05 standard (255 + 525 + 600 + 325).
    assert quote_fare(standard, 5000, 900).total_cents == 1705
    assert premium.max_surge <= standard.max_surge
    policy = region.cancellation_policy()
    assert (policy.free_cancel_window_s, policy.driver_late_grace_s) == (120.0, 300.0)
    surge = region.surge_config()
    assert surge.resolution == region.shard_h3_resolution  # a zone lies in one shard
    assert 0 < surge.smoothing < 1 and surge.interval_s == 5.0


def _bad(mutate, match: str):
    data = copy.deepcopy(_shipped())
    mutate(data)
    with pytest.raises(ConfigError, match=match) as info:
        region_from_dict(data, source="bad.toml")
    assert "bad.toml" in str(info.value)  # the error names the file


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("per_km_cents", -5, "per_km_cents"),
        ("base_cents", 2.5, "integer"),  # cents are whole
        ("minimum_cents", True, "integer"),
        ("commission_rate", 1.0, "commission_rate"),
        ("commission_rate", "a quarter", "must be a number"),
        ("max_surge", 0.5, "max_surge"),
        ("quote_ttl_s", 0, "quote_ttl_s"),
        ("reprice_distance_over_frac", -0.1, "reprice_distance_over_frac"),
        ("currency", "dollars", "ISO 4217"),
        ("per_km", 100, "unknown keys"),
    ],
)
def test_a_bad_fare_value_is_refused_at_load(key, value, match):
    _bad(lambda d: d["fares"]["xl"].__setitem__(key, value), match)


def test_bad_fare_tables_are_refused_at_load():
    _bad(lambda d: d["fares"].__setitem__("limo", {"base_cents": 1000}), "unknown vehicle classes")
    _bad(lambda d: d["fares"].__setitem__("xl", 5), "fares.xl must be a table")
    _bad(lambda d: d.__setitem__("fares", 5), r"\[fares\] must be a table")


def test_bad_cancellation_and_surge_tables_are_refused_at_load():
    _bad(lambda d: d["cancellation"].__setitem__("free_cancel_window_s", -1), "free_cancel_window_s")
    _bad(lambda d: d["cancellation"].__setitem__("grace", 1), "unknown keys")
    _bad(lambda d: d["surge"].__setitem__("resolution", 16), "resolution")
    _bad(lambda d: d["surge"].__setitem__("resolution", 7.5), "resolution")
    _bad(lambda d: d["surge"].__setitem__("smoothing", 0), "smoothing")
    _bad(lambda d: d["surge"].__setitem__("interval_s", 600), "interval_s")
    _bad(lambda d: d["surge"].__setitem__("max_surge", [3]), "max_surge")


def test_missing_tables_keep_the_defaults():
    data = _shipped()
    for name in ("fares", "cancellation", "surge"):
        del data[name]
    region = region_from_dict(data)
    assert region.fare_schedule().for_class(0).base_cents == 250  # DEFAULT_FARES["standard"]
    assert region.surge_config().interval_s == 30.0
