"""Site CA, host certificates and mutual TLS between peers, with real handshakes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bundle_helpers import CHUNK, make_bundle, model_bytes
from cryptography import x509
from peer_helpers import client, seed, start_server
from trust_helpers import trusted_store

from appliance.cli.main import main
from appliance.errors import PeerError, UsageError
from appliance.peer import tls
from appliance.peer.client import ConnectPolicy, connect_policy


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two CAs (ours and a stranger's) and host directories enrolled with them."""
    base = tmp_path_factory.mktemp("site")
    tls.init_site(base / "ca")
    tls.init_site(base / "other-ca", name="another site")
    tls.enroll_host("host-a", base / "ca", base / "a")
    tls.enroll_host("host-b", base / "ca", base / "b", ips=["10.1.2.3"])
    tls.enroll_host("intruder", base / "other-ca", base / "intruder")
    return {name: base / name for name in ("ca", "other-ca", "a", "b", "intruder")}


@pytest.fixture(scope="module")
def served(site: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    store = trusted_store(tmp_path_factory.mktemp("store") / "a")
    bundle = make_bundle({"tiny": {"m.gguf": model_bytes(5, 3 * CHUNK)}})
    seed(store, bundle)
    server = start_server(store, tls_dir=site["a"])
    yield server, bundle
    server.stop()


def test_init_writes_a_ca_and_refuses_to_overwrite(tmp_path: Path) -> None:
    ca = tls.init_site(tmp_path / "ca", name="test site")
    cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert os.stat(ca.key_path).st_mode & 0o777 == 0o600
    with pytest.raises(UsageError, match="already exists"):
        tls.init_site(tmp_path / "ca")
    assert tls.load_ca(tmp_path / "ca")[0] == cert


def test_enroll_names_the_host_and_its_addresses(site: dict[str, Path]) -> None:
    identity = tls.load_identity(site["b"])
    assert identity.hostname == "host-b"
    assert set(identity.ips) == {"127.0.0.1", "::1", "10.1.2.3"}
    cert = x509.load_pem_x509_certificate((site["b"] / tls.HOST_CERT).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-b"]
    assert (site["b"] / tls.CA_CERT).read_bytes() == (site["ca"] / tls.CA_CERT).read_bytes()
    assert os.stat(site["b"] / tls.HOST_KEY).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("hostname", ["bad host", "-lead", "a..b", "x" * 64, "under_score"])
def test_enroll_refuses_bad_hostnames(site: dict[str, Path], tmp_path: Path, hostname: str
                                      ) -> None:
    with pytest.raises(UsageError):
        tls.enroll_host(hostname, site["ca"], tmp_path / "h")


def test_enroll_refuses_bad_ips_and_missing_ca(site: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an IP"):
        tls.enroll_host("h", site["ca"], tmp_path / "h", ips=["10.0.0.300"])
    with pytest.raises(UsageError, match="does not exist"):
        tls.enroll_host("h", tmp_path / "nowhere", tmp_path / "h")


def test_enroll_refuses_a_ca_key_that_is_not_the_certificates(site: dict[str, Path],
                                                             tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(site["ca"] / tls.CA_CERT, mixed / tls.CA_CERT)
    shutil.copy(site["other-ca"] / tls.CA_KEY, mixed / tls.CA_KEY)
    with pytest.raises(UsageError, match="is not the key"):
        tls.enroll_host("h", mixed, tmp_path / "h")


def test_enroll_into_a_dir_holding_another_ca_is_refused(site: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "h"
    out.mkdir()
    shutil.copy(site["other-ca"] / tls.CA_CERT, out / tls.CA_CERT)
    with pytest.raises(UsageError, match="another CA"):
        tls.enroll_host("h", site["ca"], out)


def test_a_tls_dir_with_a_foreign_ca_cert_is_refused(site: dict[str, Path], tmp_path: Path
                                                     ) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(site["a"], bad)
    shutil.copy(site["other-ca"] / tls.CA_CERT, bad / tls.CA_CERT)
    with pytest.raises(UsageError, match="not issued by the site CA"):
        tls.server_context(bad)


def test_an_expired_host_certificate_is_refused(site: dict[str, Path], tmp_path: Path) -> None:
    old = datetime.now(UTC) - timedelta(days=30)
    tls.enroll_host("old", site["ca"], tmp_path / "old", days=1, now=old)
    with pytest.raises(UsageError, match="valid from"):
        tls.client_context(tmp_path / "old")


def test_the_server_context_refuses_renegotiation(site: dict[str, Path]) -> None:
    ctx = tls.server_context(site["a"])
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_member_lists_and_fetches_over_mutual_tls(site: dict[str, Path], served) -> None:
    server, bundle = served
    assert server.url.startswith("https://")
    with client(server.url, connect_policy(site["b"], insecure=False)) as c:
        assert [s.hash for s in c.manifests()] == [bundle.hash]
        ref = bundle.manifest.models[0].files[0].chunks[0]
        assert c.chunk(ref.digest, ref.length) is not None


def test_host_without_a_site_certificate_can_neither_list_nor_fetch(site: dict[str, Path],
                                                                     served) -> None:
    server, bundle = served
    # Trusts the site CA (so the server is accepted) but presents no certificate.
    context = ssl.create_default_context(cafile=site["ca"] / tls.CA_CERT)
    context.check_hostname = False
    ref = bundle.manifest.models[0].files[0].chunks[0]
    with client(server.url, ConnectPolicy(context, insecure=False)) as c:
        with pytest.raises(PeerError):
            c.manifests()
        with pytest.raises(PeerError):
            c.chunk(ref.digest, ref.length)


def test_a_peer_certificate_from_another_ca_is_refused(site: dict[str, Path], served) -> None:
    server, _ = served
    # The intruder's own context trusts only its CA: the handshake fails on its side...
    with client(server.url, connect_policy(site["intruder"], insecure=False)) as c, \
            pytest.raises(PeerError, match="TLS"):
        c.manifests()
    # ...and one that trusts our CA but presents the foreign certificate fails on ours.
    context = ssl.create_default_context(cafile=site["ca"] / tls.CA_CERT)
    context.check_hostname = False
    context.load_cert_chain(site["intruder"] / tls.HOST_CERT, site["intruder"] / tls.HOST_KEY)
    with client(server.url, ConnectPolicy(context, insecure=False)) as c, \
            pytest.raises(PeerError):
        c.manifests()


def test_a_server_with_a_foreign_certificate_is_refused(site: dict[str, Path], tmp_path: Path
                                                        ) -> None:
    store = trusted_store(tmp_path / "s")
    with start_server(store, tls_dir=site["intruder"]) as server, \
            client(server.url, connect_policy(site["a"], insecure=False)) as c, \
            pytest.raises(PeerError, match="TLS"):
        c.info()


def test_hostname_checking_can_be_turned_on(site: dict[str, Path], served) -> None:
    server, _ = served
    context = tls.client_context(site["b"], check_hostname=True)
    with client(server.url, ConnectPolicy(context, insecure=False)) as c:
        assert c.info().host  # 127.0.0.1 is in host-a's SAN


def test_plaintext_needs_an_explicit_insecure_flag(site: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="insecure"):
        connect_policy(None, insecure=False)
    policy = connect_policy(site["a"], insecure=False)
    with pytest.raises(UsageError, match="plaintext"):
        policy.check("http://127.0.0.1:1")
    with pytest.raises(UsageError, match="site certificate"):
        ConnectPolicy(None, insecure=True).check("https://127.0.0.1:1")


def test_curl_with_the_site_certificate_talks_to_a_peer(site: dict[str, Path], served) -> None:
    server, _ = served
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    base = ["curl", "-sS", "--max-time", "10", "--cacert", str(site["b"] / tls.CA_CERT)]
    ok = subprocess.run([*base, "--cert", str(site["b"] / tls.HOST_CERT), "--key",
                         str(site["b"] / tls.HOST_KEY), f"{server.url}/v1/info"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert '"protocol":1' in ok.stdout
    refused = subprocess.run([*base, f"{server.url}/v1/info"], capture_output=True, text=True)
    assert refused.returncode != 0


def test_site_cli_init_and_enroll(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "init", "--out", str(tmp_path / "ca")]) == 0
    assert "fingerprint" in capsys.readouterr().out
    assert main(["site", "enroll", "host-c", "--ca", str(tmp_path / "ca"), "--out",
                 str(tmp_path / "c"), "--ip", "192.168.7.9"]) == 0
    assert "192.168.7.9" in capsys.readouterr().out
    assert tls.load_identity(tmp_path / "c").hostname == "host-c"
    assert main(["site", "init", "--out", str(tmp_path / "ca")]) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().err
