"""Registry access as a site runs it: TLS from a site CA, the bearer token flow with basic
credentials from a Docker-style config.json or --password-stdin, against a real registry."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_helpers import (
    MODEL,
    RunningRegistry,
    TokenServer,
    make_site,
    needs_registry,
    start_registry,
    start_token_server,
)

from appliance.cli.main import main
from appliance.peer import tls
from appliance.store.records import list_models

pytestmark = needs_registry


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[RunningRegistry, TokenServer, Path]]:
    """A registry on TLS (site CA), whose token server wants alice:pw."""
    tls.init_site(tmp_path / "ca")
    host = tls.enroll_host("registry", tmp_path / "ca", tmp_path / "reg-tls", ips=["127.0.0.1"])
    assert host
    ca = tmp_path / "ca" / tls.CA_CERT
    token = start_token_server(tmp_path / "ca", "alice", "pw")
    running = start_registry(
        tmp_path / "registry", auth_yaml=token.registry_yaml(ca),
        tls=(tmp_path / "reg-tls" / tls.HOST_CERT, tmp_path / "reg-tls" / tls.HOST_KEY, ca))
    try:
        yield running, token, ca
    finally:
        running.stop()
        token.stop()


def test_push_and_pull_with_a_token_registry_on_tls(
        tmp_path: Path, tiny_gguf: Path, secured: tuple[RunningRegistry, TokenServer, Path],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    running, token, ca = secured
    site = make_site(tmp_path / "site", tiny_gguf)
    ref = f"{running.host}/acme/tiny:q4"
    push = ["--store", str(site.publisher), "oci", "push", MODEL, ref, "--json"]
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    # No credentials: the token server refuses, the registry's 401 is said as such (exit 3).
    assert main([*push, "--ca-file", str(ca), "--authfile", str(empty)]) == 3
    assert "--authfile" in capsys.readouterr().err
    # Without the site CA the TLS handshake fails.
    authfile = tmp_path / "config.json"
    authfile.write_text(json.dumps({"auths": {running.host: {
        "auth": base64.b64encode(b"alice:pw").decode()}}}))
    assert main([*push, "--authfile", str(authfile)]) == 3
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    assert main([*push, "--ca-file", str(ca), "--authfile", str(authfile)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert any(s.endswith(":pull,push") or s.endswith(":push,pull") for s in token.issued)
    # Pull with the password on stdin.
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert main(["--store", str(site.receiver), "oci", "pull", ref, "--ca-file", str(ca),
                 "--username", "alice", "--password-stdin", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert [m.ref for m in list_models(site.receiver) if m.verified] == [MODEL]


def test_plain_http_to_a_non_loopback_registry_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--store", str(tmp_path / "s"), "oci", "pull", "registry.site:5000/a/b:c",
                 "--plain-http"]) == 1
    assert "loopback" in capsys.readouterr().err
