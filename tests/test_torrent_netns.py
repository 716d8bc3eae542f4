"""Torrent swarms across test-made network namespaces: found by LSD alone, SSL membership.

Three hosts on a bridge (``appliance.testlan.Lan``; skipped without root): host 0 seeds an
SSL torrent of the site, host 1 (a member) fetches it with no peer named, finding the seed by
local service discovery; host 2 holds a site host certificate but no torrent certificate and
cannot take part. Real CLI processes, real multicast, nothing outside the namespaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from peer_helpers import published_bytes, stop
from torrent_helpers import MODEL, seeded_host, two_file_bundle
from trust_helpers import trusted_store

from appliance.errors import EXIT_USAGE
from appliance.peer import tls
from appliance.store.scrub import verify_store
from appliance.testlan import Lan
from appliance.torrent.certs import enroll_torrent, load_torrent_identity
from appliance.torrent.make import model_torrent


@pytest.fixture
def lan() -> Iterator[Lan]:
    why = Lan.available()
    if why:
        pytest.skip(why)
    with Lan(3) as made:
        yield made



@pytest.mark.slow
def test_member_finds_the_seed_by_lsd_and_fetches_an_ssl_torrent(lan: Lan,
                                                                  tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tls.init_site(ca)
    dirs = {}
    for host, name in ((0, "seed"), (1, "member"), (2, "visitor")):
        dirs[host] = tmp_path / f"tls-{name}"
        tls.enroll_host(name, ca, dirs[host], ips=[lan.addresses[host]])
    enroll_torrent(ca, dirs[0])
    enroll_torrent(ca, dirs[1])  # the visitor has a host certificate only
    bundle = two_file_bundle(now=datetime.now(UTC))  # the CLI checks expiry on today's clock
    seed_store = seeded_host(tmp_path / "seed", bundle)
    torrent = tmp_path / "tiny.torrent"
    torrent.write_bytes(model_torrent(seed_store, MODEL,
                                      root_cert=load_torrent_identity(dirs[0]).ca_pem)[0])
    member, visitor = trusted_store(tmp_path / "member"), trusted_store(tmp_path / "visitor")
    seeder = lan.serve(0, "--store", str(seed_store), "torrent", "seed", "--tls-dir",
                       str(dirs[0]), "--listen", f"{lan.addresses[0]}:6881")
    try:
        assert seeder.stdout is not None
        assert seeder.stdout.readline().startswith(f"seeding {MODEL}:1 ")
        assert "SSL (site CA)" in seeder.stdout.readline()
        fetched = lan.run(1, "--store", str(member), "torrent", "fetch", str(torrent),
                          "--tls-dir", str(dirs[1]), "--listen", f"{lan.addresses[1]}:6881",
                          "--timeout", "15", timeout=60)
        assert fetched.returncode == 0, fetched.stderr
        assert f"{MODEL}:1: published" in fetched.stdout
        refused = lan.run(2, "--store", str(visitor), "torrent", "fetch", str(torrent),
                          "--tls-dir", str(dirs[2]), "--listen", f"{lan.addresses[2]}:6881",
                          "--timeout", "5", timeout=60)
        assert refused.returncode == EXIT_USAGE
        assert "appliance torrent enroll" in refused.stderr
    finally:
        stop(seeder)
    for path, contents in bundle.contents[MODEL].items():
        assert published_bytes(member, MODEL, path) == contents
    assert verify_store(member).ok
