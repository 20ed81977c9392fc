"""Fares (components, minimum, rounding, quotes vs re-pricing) and the surge model."""

from __future__ import annotations

import dataclasses

import h3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.errors import ConfigError, InvalidInput, InvalidLocation, NotFound
from dispatch.geo import haversine_m
from dispatch.pricing import (
    FareBasis,
    FareRules,
    FareSchedule,
    SurgeConfig,
    SurgeModel,
    estimate_trip,
    final_fare,
    make_quote,
    quote_fare,
    round_multiplier,
)
from dispatch.region import load_region

# Round numbers so that every expected figure below can be checked by hand.
RULES = FareRules(
    currency="USD",
    base_cents=250,
    per_km_cents=110,
    per_min_cents=30,
    minimum_cents=800,
    booking_fee_cents=250,
    cancellation_fee_cents=500,
    commission_rate=0.25,
    max_surge=3.0,
    quote_ttl_s=300,
    reprice_distance_over_frac=0.25,
    reprice_duration_over_frac=0.5,
)


def test_fare_components_by_hand():
    f = quote_fare(RULES, 5000.0, 900.0)  # 5 km, 15 min
    assert (f.base_cents, f.distance_cents, f.time_cents) == (250, 550, 450)
    assert (f.surge_cents, f.minimum_adjustment_cents, f.booking_fee_cents) == (0, 0, 250)
    assert f.total_cents == 1500 and f.fare_cents == 1250
    assert f.basis is FareBasis.ESTIMATE and f.currency == "USD"


def test_surge_multiplies_the_metered_fare_not_the_booking_fee():
    f = quote_fare(RULES, 5000.0, 900.0, surge=1.5)
    assert f.surge_cents == 625  # 1250 x 0.5
    assert f.total_cents == 1250 + 625 + 250


def test_surge_is_capped_by_the_rules_and_cannot_discount():
    f = quote_fare(RULES, 5000.0, 900.0, surge=7.0)
    assert f.surge_multiplier == 3.0 and f.surge_cents == 2500
    with pytest.raises(InvalidInput):
        quote_fare(RULES, 5000.0, 900.0, surge=0.9)


def test_minimum_fare_tops_up_short_trips_before_the_booking_fee():
    f = quote_fare(RULES, 500.0, 60.0)  # 250 + 55 + 30 = 335
    assert f.minimum_adjustment_cents == 800 - 335
    assert f.total_cents == 800 + 250
    # Surge counts towards the minimum: 335 x 2 = 670, still topped up to 800.
    g = quote_fare(RULES, 500.0, 60.0, surge=2.0)
    assert (g.surge_cents, g.minimum_adjustment_cents, g.total_cents) == (335, 130, 1050)


@pytest.mark.parametrize(
    ("distance_m", "duration_s", "distance_cents", "time_cents"),
    [
        (5.0, 0.0, 1, 0),  # 0.55 cents rounds up
        (4.0, 0.0, 0, 0),  # 0.44 rounds down
        (0.0, 1.0, 0, 1),  # 0.5 cents: half up
        (0.0, 0.99, 0, 0),  # 0.495
        (150.0, 0.0, 17, 0),  # 16.5 cents: half up, where round() would give 16 (half even)
        (1234.5, 61.0, 136, 31),  # 135.795 and 30.5
    ],
)
def test_rounding_is_half_up_per_component(distance_m, duration_s, distance_cents, time_cents):
    rules = dataclasses.replace(RULES, minimum_cents=0)
    f = quote_fare(rules, distance_m, duration_s)
    assert (f.distance_cents, f.time_cents) == (distance_cents, time_cents)


def test_surge_rounding_half_up():
    rules = dataclasses.replace(RULES, base_cents=5, per_km_cents=0, per_min_cents=0, minimum_cents=0)
    assert quote_fare(rules, 0, 0, surge=1.1).surge_cents == 1  # 0.5 cents
    assert quote_fare(rules, 0, 0, surge=1.3).surge_cents == 2  # 1.5 cents


@given(
    distance_m=st.floats(0, 200_000, allow_nan=False),
    duration_s=st.floats(0, 4 * 3600, allow_nan=False),
    surge=st.floats(1.0, 5.0),
)
def test_receipt_lines_add_up_and_the_floor_holds(distance_m, duration_s, surge):
    f = quote_fare(RULES, distance_m, duration_s, surge)
    assert sum(f.lines().values()) == f.total_cents
    assert all(isinstance(v, int) and v >= 0 for v in f.lines().values())
    assert f.total_cents >= RULES.minimum_cents + RULES.booking_fee_cents
    # Longer is never cheaper.
    assert quote_fare(RULES, distance_m + 1000, duration_s, surge).total_cents >= f.total_cents


def test_bad_fare_inputs():
    for args in [(-1.0, 10.0), (10.0, float("nan")), (float("inf"), 1.0)]:
        with pytest.raises(InvalidInput):
            quote_fare(RULES, *args)


# --- estimates and quotes -------------------------------------------------------------

PICKUP = (37.7897, -122.4000)
DROPOFF = (37.7599, -122.4148)


def test_estimate_trip_is_haversine_times_detour_at_speed():
    crow = float(haversine_m(*PICKUP, *DROPOFF))
    distance_m, duration_s = estimate_trip(PICKUP, DROPOFF, speed_mps=10.0)
    assert distance_m == pytest.approx(crow * 1.35)
    assert duration_s == pytest.approx(crow * 1.35 / 10.0)
    assert 3000 < crow < 4000  # Financial District to the Mission
    assert estimate_trip(PICKUP, PICKUP, 10.0) == (0.0, 0.0)
    with pytest.raises(InvalidLocation):
        estimate_trip((91.0, 0.0), DROPOFF, 10.0)
    with pytest.raises(InvalidInput):
        estimate_trip(PICKUP, DROPOFF, 0.0)


def test_quote_is_valid_for_its_ttl():
    q = make_quote(RULES, 0, PICKUP, DROPOFF, speed_mps=10.0, surge=1.2, now=1000.0)
    assert q.fare == quote_fare(RULES, *estimate_trip(PICKUP, DROPOFF, 10.0), 1.2)
    assert q.expires_at == 1300.0
    assert q.is_valid(1000.0) and q.is_valid(1299.9) and not q.is_valid(1300.0) and not q.is_valid(999.0)


def test_quote_is_honoured_when_the_trip_stays_within_tolerance():
    quote = quote_fare(RULES, 5000.0, 900.0, surge=1.5)
    for actual in [(5000.0 * 1.25, 900.0 * 1.5), (3000.0, 600.0), (5100.0, 950.0)]:
        f = final_fare(RULES, quote, *actual, surge_locked=1.5)
        assert f.basis is FareBasis.QUOTED
        assert f.total_cents == quote.total_cents and f.distance_m == 5000.0


@pytest.mark.parametrize("actual", [(5000.0 * 1.25 + 1, 900.0), (5000.0, 900.0 * 1.5 + 1)])
def test_deviation_reprices_on_actuals_at_the_locked_surge(actual):
    quote = quote_fare(RULES, 5000.0, 900.0, surge=1.5)
    f = final_fare(RULES, quote, *actual, surge_locked=1.5)
    assert f.basis is FareBasis.REPRICED
    assert f == dataclasses.replace(quote_fare(RULES, *actual, 1.5), basis=FareBasis.REPRICED)
    assert f.total_cents > quote.total_cents


def test_no_quote_means_metered():
    f = final_fare(RULES, None, 8000.0, 1200.0, surge_locked=1.0)
    assert f.basis is FareBasis.METERED
    assert f.total_cents == 250 + 880 + 600 + 250


def test_final_fare_refuses_another_currency_and_bad_actuals():
    quote = quote_fare(dataclasses.replace(RULES, currency="EUR"), 5000.0, 900.0)
    with pytest.raises(InvalidInput, match="EUR"):
        final_fare(RULES, quote, 5000.0, 900.0, 1.0)
    with pytest.raises(InvalidInput):
        final_fare(RULES, None, -1.0, 900.0, 1.0)


def test_rules_validation_and_schedule_from_a_region():
    with pytest.raises(ConfigError):
        FareRules(base_cents=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        FareRules(commission_rate=1.0)
    with pytest.raises(ConfigError):
        FareRules(currency="dollars")
    region = load_region()
    names = region.drivers.vehicle_classes
    schedule = FareSchedule.from_section({"xl": {"base_cents": 999, "max_surge": 2}}, names, "CAD")
    assert len(schedule.by_class) == len(names)
    xl = schedule.for_class(names.index("xl"))
    assert (xl.base_cents, xl.max_surge, xl.currency) == (999, 2.0, "CAD")
    assert schedule.for_class(0).currency == "CAD"
    with pytest.raises(NotFound):
        schedule.for_class(len(names))
    with pytest.raises(ConfigError, match="unknown"):
        FareSchedule.from_section({"limo": {}}, names)
    with pytest.raises(ConfigError, match="unknown keys"):
        FareSchedule.from_section({"xl": {"base": 1}}, names)


# --- surge -----------------------------------------------------------------------------

SF = (37.7897, -122.4000)


def feed(model: SurgeModel, zone: str, demand: int, supply: int, times) -> list[float]:
    out = []
    for t in times:
        model.observe({zone: demand}, {zone: supply}, float(t))
        out.append(model.raw(zone, float(t)))
    return out


def test_zone_is_an_h3_cell_at_the_configured_resolution():
    model = SurgeModel(SurgeConfig(resolution=7))
    zone = model.zone_of(*SF)
    assert zone == h3.latlng_to_cell(*SF, 7) and h3.get_resolution(zone) == 7
    fine = h3.latlng_to_cell(*SF, 9)
    feed(model, zone, 100, 1, range(0, 300, 30))
    assert model.multiplier(fine, 270) == model.multiplier(zone, 270) > 1.0
    assert model.multiplier_at(*SF, 270) == model.multiplier(zone, 270)
    with pytest.raises(InvalidInput, match="coarser"):
        model.multiplier(h3.latlng_to_cell(*SF, 5), 270)
    with pytest.raises(InvalidInput):
        model.multiplier("not-a-cell", 270)


def test_no_data_and_balanced_zones_do_not_surge():
    model = SurgeModel()
    zone = model.zone_of(*SF)
    assert model.multiplier(zone, 0.0) == 1.0
    # 1 request per 30 s, 10 drivers: 10 requests a window over 10 drivers, ratio 1.0 < 1.2.
    feed(model, zone, 1, 10, range(0, 1200, 30))
    assert model.multiplier(zone, 1170) == 1.0


def test_sustained_demand_converges_to_the_target_and_is_smoothed():
    cfg = SurgeConfig(window_s=300, dead_band=1.2, sensitivity=0.5, smoothing=0.3, max_surge=3.0)
    model = SurgeModel(cfg)
    zone = model.zone_of(*SF)
    # 1 request per 30 s over a 10-observation window, 5 drivers: ratio 10 / 5 = 2.0,
    # target 1 + 0.5 x (2.0 - 1.2) = 1.4.
    raws = feed(model, zone, 1, 5, range(0, 3000, 30))
    assert all(b >= a - 1e-12 for a, b in zip(raws, raws[1:], strict=False))  # rises without overshoot
    assert raws[-1] == pytest.approx(1.4, abs=1e-6)
    assert model.multiplier(zone, 2970) == 1.4


def test_a_spike_moves_the_multiplier_only_part_of_the_way():
    model = SurgeModel(SurgeConfig(smoothing=0.3, max_surge=3.0))
    zone = model.zone_of(*SF)
    model.observe({zone: 1000}, {zone: 1}, 0.0)  # target capped at 3.0
    assert model.raw(zone, 0.0) == pytest.approx(1.0 + 0.3 * 2.0)
    assert model.multiplier(zone, 0.0) == 1.6


def test_surge_is_capped_and_decays_when_demand_stops():
    model = SurgeModel(SurgeConfig(max_surge=2.5))
    zone = model.zone_of(*SF)
    raws = feed(model, zone, 1000, 1, range(0, 1500, 30))
    assert max(raws) <= 2.5 and model.multiplier(zone, 1470) == 2.5
    other = model.zone_of(37.7599, -122.4148)
    # Observations continue elsewhere; this zone has no demand and its old data leaves the window.
    for t in range(1500, 3000, 30):
        model.observe({other: 0}, {other: 5, zone: 5}, float(t))
    assert model.multiplier(zone, 2970) == 1.0


def test_a_zone_without_observations_for_a_window_reads_1():
    model = SurgeModel(SurgeConfig(window_s=300))
    zone = model.zone_of(*SF)
    feed(model, zone, 1000, 1, range(0, 300, 30))
    assert model.multiplier(zone, 569) > 1.0
    assert model.multiplier(zone, 570) == 1.0  # last seen at 270


def test_finer_cells_are_summed_into_their_zone():
    model = SurgeModel(SurgeConfig(resolution=7, smoothing=1.0, dead_band=1.0, sensitivity=1.0))
    zone = model.zone_of(*SF)
    a, b = list(h3.cell_to_children(zone, 9))[:2]
    model.observe({a: 3, b: 3}, {a: 1, b: 1}, 0.0)  # 6 requests over 2 drivers: ratio 3
    assert model.raw(zone, 0.0) == pytest.approx(3.0)


def test_observations_are_validated():
    model = SurgeModel()
    zone = model.zone_of(*SF)
    model.observe({zone: 1}, {zone: 1}, 10.0)
    with pytest.raises(InvalidInput, match="before"):
        model.observe({zone: 1}, {zone: 1}, 9.0)
    with pytest.raises(InvalidInput):
        model.observe({zone: -1}, {}, 11.0)
    with pytest.raises(InvalidInput):
        model.observe({"zzz": 1}, {}, 11.0)
    with pytest.raises(ConfigError):
        SurgeConfig(smoothing=0.0)


@pytest.mark.parametrize(
    ("x", "expected"),
    [(1.0, 1.0), (1.04, 1.0), (1.05, 1.1), (1.15, 1.2), (1.149, 1.1), (1.25, 1.3), (2.96, 3.0)],
)
def test_round_multiplier_half_up_to_a_tenth(x, expected):
    assert round_multiplier(x) == expected


def test_surge_config_from_section():
    cfg = SurgeConfig.from_section({"resolution": 6, "max_surge": 2})
    assert (cfg.resolution, cfg.max_surge, cfg.window_s) == (6, 2.0, 300.0)
    with pytest.raises(ConfigError, match="unknown"):
        SurgeConfig.from_section({"cap": 2})
    with pytest.raises(ConfigError):
        SurgeConfig.from_section({"max_surge": "lots"})
