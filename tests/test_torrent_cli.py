"""``appliance torrent make|enroll|fetch`` through the real CLI parser (appliance.cli.torrent)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import libtorrent as lt
import pytest
from torrent_helpers import LOOPBACK, MODEL, seeded_host, two_file_bundle
from trust_helpers import trusted_store

from appliance.cli.main import main
from appliance.errors import EXIT_REFUSED, EXIT_USAGE
from appliance.peer import tls
from appliance.store.scrub import verify_store
from appliance.torrent.certs import TORRENT_CERT, TORRENT_KEY, load_torrent_identity
from appliance.torrent.make import model_torrent
from appliance.torrent.seed import Seeder


def test_make_writes_the_same_bytes_as_the_library(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    store = seeded_host(tmp_path / "s", two_file_bundle())
    out = tmp_path / "tiny.torrent"
    assert main(["--store", str(store), "torrent", "make", MODEL, "--insecure",
                 "-o", str(out)]) == 0
    assert f"{out}: {MODEL}:1, PLAINTEXT (--insecure)" in capsys.readouterr().out
    assert out.read_bytes() == model_torrent(store, MODEL, root_cert=None)[0]


def test_make_without_site_certificates_or_insecure_is_a_usage_error(tmp_path: Path) -> None:
    store = seeded_host(tmp_path / "s", two_file_bundle())
    assert main(["--store", str(store), "torrent", "make", MODEL]) == EXIT_USAGE


def test_enroll_then_make_an_ssl_torrent(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tls.init_site(ca)
    tls_dir = tmp_path / "tls"
    tls.enroll_host("host-a", ca, tls_dir)
    store = seeded_host(tmp_path / "s", two_file_bundle())
    assert main(["--store", str(store), "torrent", "enroll", "--ca", str(ca),
                 "--tls-dir", str(tls_dir)]) == 0
    assert (tls_dir / TORRENT_KEY).stat().st_mode & 0o777 == 0o600
    # A second enrolment never overwrites the key.
    assert main(["--store", str(store), "torrent", "enroll", "--ca", str(ca),
                 "--tls-dir", str(tls_dir)]) == EXIT_USAGE
    out = tmp_path / "ssl.torrent"
    assert main(["--store", str(store), "torrent", "make", MODEL, "--tls-dir", str(tls_dir),
                 "-o", str(out)]) == 0
    identity = load_torrent_identity(tls_dir)
    assert lt.torrent_info(out.read_bytes()).ssl_cert().strip() == identity.ca_pem.strip()
    assert (tls_dir / TORRENT_CERT).exists()


def test_fetch_of_a_torrent_with_foreign_files_exits_refused(tmp_path: Path) -> None:
    bundle = two_file_bundle(now=datetime.now(UTC))
    seed_store = seeded_host(tmp_path / "seed", bundle)
    data = bytearray(model_torrent(seed_store, MODEL, root_cert=None)[0])
    # Rename a file inside the info dict: the signed manifest does not list it.
    at = data.index(b"weights.bin")
    data[at:at + 11] = b"weights.exe"
    bad = tmp_path / "bad.torrent"
    bad.write_bytes(bytes(data))
    store = trusted_store(tmp_path / "fetcher")
    code = main(["--store", str(store), "torrent", "fetch", str(bad), "--insecure", "--no-lsd",
                 "--listen", "127.0.0.1:0"])
    assert code == EXIT_REFUSED


def test_fetch_through_the_cli_publishes(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = two_file_bundle(now=datetime.now(UTC))
    seed_store = seeded_host(tmp_path / "seed", bundle)
    torrent = tmp_path / "tiny.torrent"
    torrent.write_bytes(model_torrent(seed_store, MODEL, root_cert=None)[0])
    store = trusted_store(tmp_path / "fetcher")
    with Seeder(seed_store, LOOPBACK, identity=None) as seeder:
        seeder.add_published()
        code = main(["--store", str(store), "torrent", "fetch", str(torrent), "--insecure",
                     "--no-lsd", "--listen", "127.0.0.1:0", "--peer",
                     f"127.0.0.1:{seeder.port}"])
    assert code == 0, capsys.readouterr().err
    assert f"{MODEL}:1: published" in capsys.readouterr().out
    assert verify_store(store).ok
