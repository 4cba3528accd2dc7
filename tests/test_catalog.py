"""The embedded catalog: a real SQLite file, written by the CLI, watched by the controller."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshfed.catalog import CatalogSnapshot, EmbeddedCatalog, EmbeddedCatalogSource, Endpoint, Service
from meshfed.errors import CatalogError
from tests.test_cli import meshfed_cli


def _web(*ports: int, name: str = "web") -> Service:
    return Service(
        name=name,
        ports={"http": 8080},
        endpoints=[Endpoint(address="127.0.0.1", port=port, labels={"version": "v1"}) for port in ports],
    )


def test_register_replace_and_deregister(tmp_path):
    with EmbeddedCatalog(tmp_path) as catalog:
        assert catalog.load().services == []
        assert catalog.register(_web(9001)) == 1
        assert catalog.register(_web(9001, 9002)) == 2
        snapshot = catalog.load()
        assert snapshot.version == 2
        (web,) = snapshot.services
        assert [endpoint.key for endpoint in web.endpoints] == ["127.0.0.1:9001", "127.0.0.1:9002"]
        assert catalog.deregister("default", "web") == 3
        assert catalog.load().services == []
        with pytest.raises(CatalogError, match=r"no service web\.default"):
            catalog.deregister("default", "web")
        assert catalog.version() == 3


def test_catalog_survives_reopening(tmp_path):
    with EmbeddedCatalog(tmp_path) as catalog:
        catalog.register(_web(9001))
    with EmbeddedCatalog(tmp_path) as catalog:
        assert catalog.load().service("default", "web") == _web(9001)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "Web"}, "DNS label"),
        ({"namespace": "a_b"}, "DNS label"),
        ({"ports": {"http": 70000}}, "outside 1-65535"),
        ({"endpoints": [{"address": "web.local", "port": 80}]}, "must be an IP address"),
        ({"endpoints": [{"address": "10.0.0.1", "port": 0}]}, "greater than or equal to 1"),
        ({"surprise": True}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_services_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        Service.model_validate({"name": "web", **fields})


def test_watch_wakes_on_a_write_from_another_connection(tmp_path):
    with EmbeddedCatalog(tmp_path) as catalog:
        since = catalog.version()
    watcher = EmbeddedCatalogSource(tmp_path)

    def write_later() -> None:
        with EmbeddedCatalog(tmp_path) as writer:
            writer.register(_web(9001))

    async def watch() -> CatalogSnapshot:
        try:
            return await watcher.watch(since, timeout=10)
        finally:
            await watcher.aclose()

    timer = threading.Timer(0.2, write_later)
    timer.start()
    snapshot = asyncio.run(watch())
    timer.join()
    assert snapshot.version == since + 1
    assert snapshot.service("default", "web") is not None


def test_an_idle_watch_reads_no_services_again(tmp_path):
    """The change feed, not a reread: an unchanged catalog hands back the very snapshot it read before."""
    with EmbeddedCatalog(tmp_path) as catalog:
        catalog.register(_web(9001))
    source = EmbeddedCatalogSource(tmp_path)

    async def scenario() -> None:
        try:
            first = await source.snapshot()
            assert await source.watch(first.version, timeout=0.05) is first
            with EmbeddedCatalog(tmp_path) as writer:
                writer.register(_web(9002))
            changed = await source.watch(first.version, timeout=10)
            assert changed is not first
            assert changed.version == first.version + 1
        finally:
            await source.aclose()

    asyncio.run(scenario())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    operations=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.lists(st.integers(1, 65535), max_size=3))),
        max_size=12,
    )
)
def test_catalog_matches_a_last_write_wins_model(tmp_path_factory, operations):
    model: dict[str, Service] = {}
    with EmbeddedCatalog(tmp_path_factory.mktemp("catalog")) as catalog:
        for name, ports in operations:
            if ports is None:
                if name in model:
                    catalog.deregister("default", name)
                    del model[name]
            else:
                service = _web(*sorted(set(ports)), name=name)
                catalog.register(service)
                model[name] = service
        snapshot = catalog.load()
    assert {service.name: service for service in snapshot.services} == model


def test_cli_register_list_deregister(tmp_path):
    zone = tmp_path / "east"
    assert meshfed_cli("zone", "init", "--dir", zone, "--name", "east", "--trust-domain", "east.mesh").returncode == 0
    registered = meshfed_cli(
        "service",
        "register",
        "--dir",
        zone,
        "--name",
        "web",
        "--port",
        "http=8080",
        "--endpoint",
        "127.0.0.1:9001;version=v2;weight=3",
        "--endpoint",
        "127.0.0.1:9002;healthy=false",
    )
    assert registered.returncode == 0, registered.stderr
    with EmbeddedCatalog(zone) as catalog:
        web = catalog.load().service("default", "web")
    assert web is not None
    assert web.endpoints[0].labels == {"version": "v2"}
    assert web.endpoints[0].weight == 3
    assert web.endpoints[0].zone == "east"
    assert [endpoint.healthy for endpoint in web.endpoints] == [True, False]
    listed = meshfed_cli("catalog", "list", "--dir", zone).stdout.decode()
    assert "web.default" in listed
    assert "1/2" in listed
    assert meshfed_cli("service", "deregister", "--dir", zone, "--name", "web").returncode == 0
    assert "web.default" not in meshfed_cli("service", "list", "--dir", zone).stdout.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--port", "http=80x", "--endpoint", "127.0.0.1:1"), "must be an integer"),
        (("--port", "http=80", "--endpoint", "localhost"), "must start with IP:PORT"),
        (("--port", "http=80", "--endpoint", "example.com:80"), "must be an IP address"),
        (("--port", "http=80", "--endpoint", "127.0.0.1:80;weight=heavy"), "weight must be a positive integer"),
    ],
)
def test_cli_refuses_bad_services_in_one_line_and_keeps_the_catalog(tmp_path, args, message):
    zone = tmp_path / "east"
    meshfed_cli("zone", "init", "--dir", zone, "--name", "east", "--trust-domain", "east.mesh")
    result = meshfed_cli("service", "register", "--dir", zone, "--name", "web", *args)
    assert result.returncode == 1
    assert message in result.stderr.decode()
    assert len(result.stderr.decode().strip().splitlines()) == 1
    with EmbeddedCatalog(zone) as catalog:
        assert catalog.load().services == []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.lists(
            st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.one_of(st.none(), st.integers(1, 65535))), max_size=3
        ),
        max_size=6,
    )
)
def test_a_running_source_reads_only_what_was_written_and_matches_a_full_read(tmp_path_factory, steps):
    """Between two reads of the running zone's source, other connections write; each read equals a full
    load of the file, and the services no write touched are the previous read's very objects."""
    directory = tmp_path_factory.mktemp("catalog")
    with EmbeddedCatalog(directory) as catalog:
        catalog.register(_web(1, name="a"))
    source = EmbeddedCatalogSource(directory)

    async def scenario() -> None:
        try:
            previous = await source.snapshot()
            for writes in steps:
                touched = set()
                with EmbeddedCatalog(directory) as writer:
                    for name, port in writes:
                        touched.add(name)
                        if port is not None:
                            writer.register(_web(port, name=name))
                        elif writer.load().service("default", name) is not None:
                            writer.deregister("default", name)
                    full = writer.load()
                current = await source.snapshot()
                assert current == full
                for service in current.services:
                    if service.name not in touched:
                        assert service is previous.service("default", service.name)
                previous = current
        finally:
            await source.aclose()

    asyncio.run(scenario())
