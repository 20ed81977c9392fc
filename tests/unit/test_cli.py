"""The command line without a cluster: region inspection and copying a region to edit."""

import pytest

from api.cli import main
from dispatch.region import load_region


def test_region_show_lists_every_shard(capsys):
    assert main(["region", "show"]) == 0
    out = capsys.readouterr().out
    region = load_region()
    for k in range(region.shard_count):
        assert f"shard {k}:" in out
    assert "San Francisco" in out


def test_a_copied_region_file_loads_and_can_be_edited(tmp_path, capsys):
    dest = tmp_path / "city.toml"
    assert main(["region", "copy", str(dest)]) == 0
    text = dest.read_text().replace("shard_count = 4", "shard_count = 2")
    dest.write_text(text)
    assert load_region(dest).shard_count == 2
    assert main(["region", "show", "--region", str(dest)]) == 0
    assert "2 shards" in capsys.readouterr().out


def test_unknown_commands_are_refused():
    with pytest.raises(SystemExit) as err:
        main(["fly"])
    assert err.value.code == 2


def test_shard_status_shows_a_shard_whose_event_bus_is_down():
    from api.cli import _bus_cell

    assert _bus_cell({"events": {"bus": {"ok": True, "since_ok_s": 0.1}}}) == "ok"
    assert _bus_cell({"events": {"bus": {"ok": False, "since_ok_s": 12.4}}}) == "DOWN 12s"
    assert _bus_cell({"events": {"bus": {"ok": False, "since_ok_s": None}}}) == "DOWN"
