import hashlib
import stat
import tomllib
from pathlib import Path

import pytest
import tomli_w

from meshfed.errors import ZoneError
from meshfed.zone import Zone


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_init_creates_the_zone_layout_with_private_files_locked_down(tmp_path):
    zone = Zone.init(tmp_path / "east", "east", "east.mesh")
    directory = tmp_path / "east"
    for name in ("zone.toml", "state.db", "admin-token", "ca/root.pem", "ca/intermediate.pem"):
        assert (directory / name).is_file(), name
    for private in ("ca/root.key", "ca/intermediate.key", "admin-token", "state.db"):
        assert _mode(directory / private) == 0o600, private
    assert _mode(directory) == 0o700
    config = tomllib.loads((directory / "zone.toml").read_text())
    assert config["name"] == "east"
    assert config["trust_domain"] == "east.mesh"
    assert len(zone.admin_token()) >= 32
    assert [stored.source for stored in zone.trust.trusted_bundles()] == ["self"]
    reopened = Zone.open(directory)
    assert reopened.trust_domain == zone.trust_domain


def test_init_refuses_to_overwrite_an_existing_zone_and_changes_nothing(tmp_path):
    Zone.init(tmp_path / "east", "east", "east.mesh")
    before = _snapshot(tmp_path / "east")
    with pytest.raises(ZoneError, match="already holds a zone"):
        Zone.init(tmp_path / "east", "other", "other.mesh")
    assert _snapshot(tmp_path / "east") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["east"]


def test_init_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ZoneError, match="not an empty directory"):
        Zone.init(tmp_path / "busy", "busy", "busy.mesh")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_init_into_an_empty_directory_works(tmp_path):
    (tmp_path / "empty").mkdir()
    Zone.init(tmp_path / "empty", "empty", "empty.mesh")
    assert (tmp_path / "empty" / "zone.toml").is_file()


@pytest.mark.parametrize(
    ("name", "trust_domain", "message"),
    [
        ("East", "east.mesh", "name: a zone name is a DNS label"),
        ("east", "East.Mesh", "trust_domain: trust domain 'East.Mesh' may contain only lowercase"),
        ("east", "", "trust_domain: trust domain is empty"),
    ],
)
def test_init_rejects_bad_names_and_leaves_nothing(tmp_path, name, trust_domain, message):
    with pytest.raises(ZoneError, match=message):
        Zone.init(tmp_path / "z", name, trust_domain)
    assert list(tmp_path.iterdir()) == []


def test_open_explains_a_missing_or_broken_zone(tmp_path):
    with pytest.raises(ZoneError, match="not a zone directory"):
        Zone.open(tmp_path)
    (tmp_path / "zone.toml").write_text('name = "east"\ntrust_domain = "east.mesh"\nsurprise = 1\n')
    with pytest.raises(ZoneError, match="surprise"):
        Zone.open(tmp_path)


def _edit_zone_toml(directory: Path, **changes: str) -> None:
    toml = directory / "zone.toml"
    toml.write_text(tomli_w.dumps({**tomllib.loads(toml.read_text()), **changes}))


def test_zone_toml_cannot_rename_a_zone_or_change_its_trust_domain(tmp_path):
    zone = Zone.init(tmp_path / "east", "east", "east.mesh")
    before = _snapshot(zone.directory)
    _edit_zone_toml(zone.directory, name="west")
    with pytest.raises(ZoneError, match="name is 'west', but this zone was created as 'east'"):
        Zone.open(zone.directory)
    _edit_zone_toml(zone.directory, name="east", trust_domain="other.mesh")
    with pytest.raises(ZoneError, match=r"trust_domain is 'other\.mesh', but this zone's CA, SVIDs and peerings"):
        Zone.open(zone.directory)
    _edit_zone_toml(zone.directory, trust_domain="east.mesh")
    assert Zone.open(zone.directory).name == "east"
    after = _snapshot(zone.directory)
    assert {k: v for k, v in after.items() if k != "zone.toml"} == {
        k: v for k, v in before.items() if k != "zone.toml"
    }, "a refused open must change nothing"


def test_a_zone_made_before_identities_were_recorded_gets_its_own(tmp_path):
    zone = Zone.init(tmp_path / "east", "east", "east.mesh")
    with zone.store() as store:
        store._db.execute("DELETE FROM zone_identity")
    _edit_zone_toml(zone.directory, trust_domain="other.mesh")
    with pytest.raises(ZoneError, match=r"trust_domain is 'other\.mesh'"):
        Zone.open(zone.directory)  # its own bundle says which domain it is
    _edit_zone_toml(zone.directory, trust_domain="east.mesh")
    Zone.open(zone.directory)
    with zone.store() as store:
        assert store.identity() == ("east", "east.mesh")


def test_failover_policy_is_read_from_zone_toml_and_checked(tmp_path):
    zone = Zone.init(tmp_path / "west", "west", "west.mesh")
    toml = zone.directory / "zone.toml"
    document = tomllib.loads(toml.read_text())
    assert "failover" not in document  # a default table is left out, so an operator's own does not clash
    document["failover"] = {"order": ["north", "east"], "split": {"east": 90, "south": 10}}
    toml.write_text(tomli_w.dumps(document))
    config = Zone.open(zone.directory).config.failover
    assert config.order == ["north", "east"]
    assert config.split == {"east": 90, "south": 10}
    document["failover"]["split"]["south"] = 0
    toml.write_text(tomli_w.dumps(document))
    with pytest.raises(ZoneError, match=r"zone\.toml.*weight of 'south'"):
        Zone.open(zone.directory)


def test_zone_toml_written_at_init_takes_every_optional_table(tmp_path):
    """The commented examples parse once uncommented, and README snippets can be appended as they are."""
    zone = Zone.init(tmp_path / "east", "east", "east.mesh")
    path = zone.directory / "zone.toml"
    written = path.read_text()
    uncommented = "\n".join(
        line.removeprefix("# ") if line.startswith("# [") or (line.startswith("# ") and "=" in line) else line
        for line in written.splitlines()
    )
    path.write_text(uncommented)
    config = Zone.open(zone.directory).config
    assert config.failover.order == ["east", "north"]
    assert config.split[0].weights == {"v1": 90, "v2": 10}
    assert config.authz[0].id == "spiffe://west.mesh/ns/shop/*"
    assert config.egress.workload_tls == "strict"

    # The README's [failover] snippet appended to a fresh zone.toml: no table is declared twice.
    path.write_text(written + '\n[failover]\nsplit = {east = 90, north = 10}\norder = ["south"]\n')
    assert Zone.open(zone.directory).config.failover.order == ["south"]
