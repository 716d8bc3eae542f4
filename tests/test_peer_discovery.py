"""Peer discovery: the site config's static list, mDNS records (hostile ones too), and a real
advertise + browse across test-made network namespaces."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_helpers import CHUNK, make_bundle, model_bytes
from peer_helpers import published_bytes, seed, stop
from trust_helpers import trusted_store
from zeroconf import ServiceInfo

from appliance.errors import PeerError, UsageError
from appliance.peer import discovery
from appliance.peer.protocol import SERVICE_TYPE
from appliance.testlan import Lan


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_site_config_static_peers_and_tls_dir(tmp_path: Path) -> None:
    config = discovery.load_site_config(write(tmp_path, (
        "peers:\n  - https://10.0.0.5:8765\n  - host-b.lan:9000\n  - 10.0.0.5:8765\n"
        "tls_dir: tls\n")))
    assert config.peers == ("https://10.0.0.5:8765", "https://host-b.lan:9000")
    assert config.tls_dir == tmp_path / "tls"
    assert [p.source for p in discovery.static_peers(config)] == ["static", "static"]
    assert discovery.load_site_config(tmp_path / "absent.yaml") == discovery.SiteConfig()
    assert discovery.load_site_config(write(tmp_path, "")) == discovery.SiteConfig()


@pytest.mark.parametrize(
    "text",
    [
        "- a\n- b\n",  # not a mapping
        "peers: []\nlisten: 1\n",  # unknown key
        "peers: https://a:1\n",  # not a list
        "peers: [1]\n",  # not a URL
        "peers: ['ftp://a:1']\n",  # not http(s)
        "peers: ['https://a:1/path']\n",
        "tls_dir: [a]\n",
        "peers: &x [a]\nmore: *x\n",  # aliases are refused
        "peers: [\n",  # broken YAML
    ],
)
def test_hostile_site_configs(tmp_path: Path, text: str) -> None:
    with pytest.raises(UsageError):
        discovery.load_site_config(write(tmp_path, text))


def test_site_config_caps(tmp_path: Path) -> None:
    many = "peers:\n" + "".join(f"  - https://10.0.{i // 250}.{i % 250 + 1}:1\n"
                                for i in range(discovery.MAX_STATIC_PEERS + 1))
    with pytest.raises(UsageError):
        discovery.load_site_config(write(tmp_path, many))
    with pytest.raises(UsageError, match="over"):
        discovery.load_site_config(write(tmp_path, "#" * (discovery.MAX_SITE_CONFIG_BYTES + 1)))


def test_service_record_round_trip() -> None:
    info = discovery.service_info("host-a", 8765, ["10.0.0.5"], scheme="https")
    assert info.type == SERVICE_TYPE and info.name.endswith(SERVICE_TYPE)
    peer = discovery.peer_from_info(info)
    assert peer == discovery.Peer("https://10.0.0.5:8765", "host-a", "mdns")
    with pytest.raises(UsageError):
        discovery.service_info("h", 1, ["10.0.0.5"], scheme="ftp")
    with pytest.raises(PeerError):
        discovery.service_info("h", 1, [], scheme="https")


def record(properties: dict[bytes, bytes], *, port: int = 8765, addresses: list[str] | None = None
           ) -> ServiceInfo:
    return ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=port, properties=properties,
                       server="x.local.",
                       parsed_addresses=["10.0.0.9"] if addresses is None else addresses)


@pytest.mark.parametrize(
    "info",
    [
        record({b"proto": b"2", b"scheme": b"https"}),
        record({b"scheme": b"https"}),
        record({b"proto": b"1", b"scheme": b"gopher"}),
        record({b"proto": b"1", b"scheme": b"https"}, port=0),
        record({b"proto": b"1", b"scheme": b"https"}, addresses=[]),
        record({b"proto": b"1", b"scheme": b"https"}, addresses=["224.0.0.251"]),
        record({b"proto": b"1", b"scheme": b"\xff\xfe"}),
    ],
)
def test_hostile_mdns_records_are_ignored(info: ServiceInfo) -> None:
    assert discovery.peer_from_info(info) is None


def test_local_addresses_are_unicast_ipv4() -> None:
    for text in discovery.local_addresses(include_loopback=True):
        assert text.count(".") == 3 and not text.startswith("224.")


# --- real multicast between namespaces ---------------------------------------------------


@pytest.fixture
def lan() -> Iterator[Lan]:
    why = Lan.available()
    if why:
        pytest.skip(why)
    with Lan(2) as made:
        yield made



@pytest.mark.slow
def test_advertise_browse_and_pull_across_namespaces(lan: Lan, tmp_path: Path) -> None:
    """Host 0 serves and advertises; host 1 finds it by mDNS alone, lists it and pulls."""
    bundle = make_bundle({"tiny": {"model.gguf": model_bytes(31, 5 * CHUNK)}})
    a = trusted_store(tmp_path / "a")
    seed(a, bundle)
    b = trusted_store(tmp_path / "b")
    server = lan.serve(0, "--store", str(a), "peer", "serve", "--insecure",
                       "--listen", "0.0.0.0:8765")
    try:
        assert server.stdout is not None
        assert "serving" in server.stdout.readline()
        assert lan.addresses[0] in server.stdout.readline()  # "advertising ... on <address>"
        listed = lan.run(1, "--store", str(b), "peer", "list", "--insecure", "--json",
                         "--browse-seconds", "3")
        assert listed.returncode == 0, listed.stderr
        [entry] = json.loads(listed.stdout)
        assert entry["source"] == "mdns"
        assert entry["url"] == f"http://{lan.addresses[0]}:8765"
        assert entry["manifests"][0]["hash"] == bundle.hash
        pulled = lan.run(1, "--store", str(b), "peer", "pull", "tiny", "--insecure",
                         "--browse-seconds", "3")
        assert pulled.returncode == 0, pulled.stderr
        assert published_bytes(b, "tiny", "model.gguf") == bundle.contents["tiny"]["model.gguf"]
    finally:
        stop(server)
    # Once the server is gone, nobody answers the query.
    gone = lan.run(1, "--store", str(b), "peer", "list", "--insecure", "--json",
                   "--browse-seconds", "2")
    assert json.loads(gone.stdout) == []
