"""Fixture plugins: each module owns one part of the real stack the tests start."""

pytest_plugins = ["tests.fixtures_ray", "tests.fixtures_pg", "tests.fixtures_edge"]
