"""The CLI and the TUI make each library decision through the same function (issue 13, item 2).

Trust install (several root files walked as a chain, in any order), the trust summary, the
peer TLS directory and peer listing, the servable model names, the serve-start audit and the
rule that an expiry override needs a reason: each is asked of both shells here and must
answer the same, with real stores and root files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from store_helpers import model_entry, write_model
from trust_helpers import NOW, make_root

from appliance.cli.main import main
from appliance.errors import ModelNotFoundError, UsageError
from appliance.peer import site, tls
from appliance.serve.store_resolver import servable_names
from appliance.store import trust_state, trust_summary
from appliance.store.store import Store
from appliance.tui import peering, service
from appliance.tui.trust import root_paths


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, str]:
    """root-1.yaml, root-2.yaml (a rotation signed by v1's and its own root keys), v1's
    fingerprint."""
    v1 = make_root()
    v2 = make_root(version=2, root_keys=("r1", "r2", "r4"), sign_with=("r1", "r2"))
    (tmp_path / "root-1.yaml").write_bytes(v1.to_bytes())
    (tmp_path / "root-2.yaml").write_bytes(v2.to_bytes())
    return tmp_path / "root-1.yaml", tmp_path / "root-2.yaml", v1.root.fingerprint


def test_tui_installs_several_root_files_like_the_cli(tmp_path: Path,
                                                     roots: tuple[Path, Path, str]) -> None:
    one, two, fingerprint = roots
    # Newest first on purpose: both shells sort by version and walk the chain.
    tui = service.install_root(tmp_path / "tui", [two, one], fingerprint, NOW)
    result = trust_state.install_roots(tmp_path / "lib", [trust_state.read_root_file(p)
                                                          for p in (two, one)],
                                       fingerprint, NOW)
    assert tui.version == result.root.version == 2
    assert result.first is not None and result.first.version == 1
    assert result.start is not None and result.start.version == 1
    assert [v for v, _, _ in trust_state.installed_versions(tmp_path / "tui")] == [1, 2]
    # A fresh store without the paper fingerprint: the same usage error in both.
    with pytest.raises(UsageError, match="trusts no root yet"):
        service.install_root(tmp_path / "fresh", [one], "", NOW)
    assert trust_state.installed_root(tmp_path / "fresh") is None


def test_install_dialog_takes_one_path_with_spaces_or_several(tmp_path: Path) -> None:
    spaced = tmp_path / "USB DISK" / "root-1.yaml"
    spaced.parent.mkdir()
    spaced.write_bytes(b"x")
    assert root_paths(f"  {spaced} ") == [spaced]
    assert root_paths("/media/a/root-1.yaml /media/a/root-2.yaml") == [
        Path("/media/a/root-1.yaml"), Path("/media/a/root-2.yaml")]
    assert root_paths("'/media/my disk/root-2.yaml' x.yaml") == [
        Path("/media/my disk/root-2.yaml"), Path("x.yaml")]


def test_trust_summary_is_one_for_the_cli_and_the_tui(
        tmp_path: Path, roots: tuple[Path, Path, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    one, two, fingerprint = roots
    store = tmp_path / "store"
    assert main(["--store", str(store), "trust", "install", str(one), str(two),
                 "--fingerprint", fingerprint]) == 0
    capsys.readouterr()
    assert main(["--store", str(store), "trust", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    view = service.trust_view(store, NOW)
    assert view == trust_summary.store_summary(store, NOW) and view is not None
    cli = {k: v for k, v in shown.items() if k not in ("ok", "source", "expired")}
    assert cli == {k: v for k, v in view.to_json().items() if k != "expired"}
    assert view.thresholds == (("root", 2, 3), ("publisher", 1, 2))
    assert [i.version for i in view.installed] == [1, 2]


def test_peer_tls_dir_is_chosen_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    missing = tmp_path / "no-such-tls"
    settings = peering.PeerSettings(tls_dir=missing, insecure=False)
    with pytest.raises(UsageError, match="does not exist"):
        peering.policy_for(store, settings)  # the TUI used to take any path
    with pytest.raises(UsageError, match="does not exist"):
        site.connection(store, site.site_config(store), missing, False)
    with pytest.raises(UsageError, match="pass --tls-dir DIR") as tui:
        peering.policy_for(store, peering.PeerSettings(tls_dir=None, insecure=False))
    with pytest.raises(UsageError) as lib:
        site.tls_dir(store, site.site_config(store), None, False)
    assert str(tui.value) == str(lib.value)
    _, mode = peering.policy_for(store, peering.PeerSettings(tls_dir=None, insecure=True))
    assert mode == site.connection(store, site.site_config(store), None, True).mode
    assert "PLAINTEXT" in mode


def test_peer_list_refuses_plaintext_peers_in_place(tmp_path: Path) -> None:
    """A typed plaintext URL without --insecure is listed with why, not a failed screen."""
    store = tmp_path / "store"
    tls.init_site(tmp_path / "ca")
    tls.enroll_host("host-a", tmp_path / "ca", store / "tls")
    conn = site.connection(store, site.site_config(store), None, False)  # found at STORE/tls
    assert conn.tls_dir == store / "tls"
    peers = site.known_peers(site.site_config(store), extra=["http://10.9.9.9:8765"],
                             extra_source="typed", mdns=False)
    [view] = site.list_peers(peers, conn.policy)
    assert view.source == "typed" and view.problem is not None and "plaintext" in view.problem
    assert view.to_json() == {"url": "http://10.9.9.9:8765", "source": "typed",
                              "name": "10.9.9.9:8765", "error": view.problem}


def test_servable_names(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = b"m" * 4096
    with Store(store) as s:
        for name, version in (("solo", "1"), ("twin", "a"), ("twin", "b")):
            write_model(s, model_entry(name, version, {"m.gguf": data}), {"m.gguf": data})
    assert servable_names(store) == ("solo", "twin:a", "twin:b")
    assert servable_names(store, ["twin:b", "solo", "twin:b"]) == ("twin:b", "solo")
    with pytest.raises(ModelNotFoundError):
        servable_names(store, ["nope"])
    empty = tmp_path / "empty"
    Store(empty).close()
    with pytest.raises(UsageError, match="no verified model"):
        servable_names(empty)


def test_an_override_needs_a_reason_in_both_shells() -> None:
    trust_state.require_override_reason(False, None)
    trust_state.require_override_reason(True, "clock drift, ticket 7")
    for reason in (None, "", "   "):
        with pytest.raises(UsageError, match="--allow-expired needs --reason TEXT"):
            trust_state.require_override_reason(True, reason)
        assert service.override_reason(reason) is None
    assert service.override_reason("  ticket 7 ") == "ticket 7"
