"""``appliance keys`` and ``appliance trust`` end to end with real key files and a real store."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from trust_helpers import DAY

from appliance.cli.main import main
from appliance.format.signing import key_id
from appliance.format.trust import TrustKey, encode_envelope, parse_signed_root
from appliance.format.trust_build import new_root_body, sign_root_body
from appliance.keyfiles import PASSPHRASE_ENV, load_private_key, load_public_key
from appliance.store import audit, trust_state

Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> Path:
    """Encrypted keys made by the CLI: root keys alice bob carol dave, publishers acme ops."""
    monkeypatch.setenv(PASSPHRASE_ENV, "ceremony passphrase")
    out = tmp_path / "keys"
    for name in ("alice", "bob", "carol", "dave", "acme", "ops"):
        assert main(["keys", "generate", name, "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def _run(capsys: Capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _init(keys: Path, out: Path, *sign_with: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "trust", "init",
        "--root-key", str(keys / "alice.pub"), str(keys / "bob.pub"), str(keys / "carol.pub"),
        "--root-threshold", "2",
        "--publisher-key", f"{keys / 'acme.pub'}:acme/*", str(keys / "ops.pub"),
        "--publisher-threshold", "1",
        "--sign-with", *[str(keys / f"{n}.key") for n in sign_with],
        "--out", str(out), *extra,
    ]


def test_keys_generate_prints_id_and_words(tmp_path: Path, capsys: Capsys) -> None:
    code, out, _ = _run(capsys, "keys", "generate", "t1", "--out", tmp_path, "--unencrypted")
    assert code == 0
    public = load_public_key(tmp_path / "t1.pub")
    assert f"key id:      {key_id(public)}" in out
    assert re.search(r"fingerprint: [a-z]+(-[a-z]+){7}\n", out)
    assert "UNENCRYPTED" in out
    load_private_key(tmp_path / "t1.key")


def test_keys_generate_encrypted_with_env(keys: Path) -> None:
    assert (keys / "alice.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED")
    load_private_key(keys / "alice.key", b"ceremony passphrase")


def test_keys_generate_without_passphrase_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    code, _, err = _run(capsys, "keys", "generate", "k", "--out", tmp_path)
    assert code == 1 and "UsageError" in err
    assert not (tmp_path / "k.key").exists()


def test_trust_flow_init_install_rotate_show(keys: Path, tmp_path: Path, capsys: Capsys) -> None:
    store = tmp_path / "site-store"
    root1, root2 = tmp_path / "root-1.yaml", tmp_path / "root-2.yaml"
    code, out, _ = _run(capsys, *_init(keys, root1, "alice", "bob"))
    assert code == 0 and "2 of 2 signatures from its own root keys (ok)" in out

    code, out, _ = _run(capsys, "trust", "fingerprint", root1)
    fingerprint = out.strip()
    assert code == 0 and out.count("\n") == 1
    assert fingerprint == parse_signed_root(root1.read_bytes()).root.fingerprint

    code, _, err = _run(capsys, "--store", store, "trust", "install", root1,
                        "--fingerprint", "0" * 32)
    assert code == 2 and "FingerprintMismatchError" in err and fingerprint not in err
    code, _, err = _run(capsys, "--store", store, "trust", "install", root1)
    assert code == 1 and "--fingerprint" in err
    paper = fingerprint.replace("-", " ").upper()  # as read off paper
    code, out, _ = _run(capsys, "trust", "install", root1, "--fingerprint", paper,
                        "--store", store)
    assert code == 0 and "installed trust root v1" in out

    # v2: carol leaves, dave joins the root role; ops is revoked as a publisher.
    code, _, err = _run(
        capsys, "trust", "rotate", root1, "--out", root2,
        "--add-key", f"root={keys / 'dave.pub'}", "--remove-key", f"root={keys / 'carol.pub'}",
        "--remove-key", f"publisher={keys / 'ops.pub'}",
        "--sign-with", keys / "dave.key", keys / "carol.key",
    )
    assert code == 1 and "v1's root keys (NEEDS 1 MORE)" in err and not root2.exists()
    code, out, _ = _run(
        capsys, "trust", "rotate", root1, "--out", root2,
        "--add-key", f"root={keys / 'dave.pub'}", "--remove-key", f"root={keys / 'carol.pub'}",
        "--remove-key", f"publisher={keys / 'ops.pub'}",
        "--sign-with", keys / "alice.key", keys / "dave.key", "--partial",
    )
    assert code == 0 and "v1's root keys (NEEDS 1 MORE)" in out
    code, _, err = _run(capsys, "--store", store, "trust", "install", root2)
    assert code == 2 and "RotationError" in err
    code, out, _ = _run(capsys, "trust", "sign", root2, "--sign-with", keys / "bob.key",
                        "--previous", root1)
    assert code == 0 and "2 of 2 signatures from v1's root keys (ok)" in out
    code, out, _ = _run(capsys, "--store", store, "trust", "install", root1, root2)
    assert code == 0 and "updated v1 -> v2" in out

    code, out, _ = _run(capsys, "--store", store, "trust", "show", "--json")
    shown = json.loads(out)
    assert shown["version"] == 2 and not shown["expired"]
    names = {k["name"]: k for k in shown["keys"]}
    assert set(names) == {"alice", "bob", "dave", "acme"}
    assert names["acme"]["models"] == ["acme/*"] and names["dave"]["roles"] == ["root"]
    assert [i["version"] for i in shown["installed"]] == [1, 2]
    code, out, _ = _run(capsys, "--store", store, "trust", "show")
    assert code == 0 and "role root: 2 of 3 keys must sign" in out and "acme/*" in out

    kinds = [r.kind for r in audit.records(store)]
    assert kinds == ["refusal", "trust-install", "refusal", "trust-update"]
    assert audit.verify(store) == 4


def test_init_refuses_too_few_signatures_unless_partial(
    keys: Path, tmp_path: Path, capsys: Capsys
) -> None:
    out_file = tmp_path / "root.yaml"
    code, _, err = _run(capsys, *_init(keys, out_file, "alice"))
    assert code == 1 and "NEEDS 1 MORE" in err and not out_file.exists()
    code, _, _ = _run(capsys, *_init(keys, out_file, "alice", extra=("--partial",)))
    assert code == 0 and out_file.exists()
    code, _, err = _run(capsys, *_init(keys, out_file, "alice", "bob"))
    assert code == 1 and "--force" in err
    code, out, _ = _run(capsys, "trust", "sign", out_file, "--sign-with", keys / "carol.key")
    assert code == 0 and "2 of 2 signatures from its own root keys (ok)" in out


@pytest.mark.parametrize(
    "extra",
    [
        ("--root-threshold", "4"),
        ("--publisher-threshold", "0"),
        ("--expires", "0"),
    ],
)
def test_init_bad_options_are_usage_errors(
    keys: Path, tmp_path: Path, capsys: Capsys, extra: tuple[str, str]
) -> None:
    argv = _init(keys, tmp_path / "r.yaml", "alice", "bob", extra=extra)
    assert _run(capsys, *argv)[0] == 1
    assert not (tmp_path / "r.yaml").exists()


def test_bad_publisher_pattern_and_private_key_as_public(
    keys: Path, tmp_path: Path, capsys: Capsys
) -> None:
    argv = _init(keys, tmp_path / "r.yaml", "alice", "bob")
    bad_pattern = [a.replace(":acme/*", ":acme/[x]") for a in argv]
    assert _run(capsys, *bad_pattern)[0] == 1
    private_as_public = [a.replace("ops.pub", "ops.key") for a in argv]
    code, _, err = _run(capsys, *private_as_public)
    assert code == 3 and "PRIVATE key" in err


def test_install_expired_root_needs_reason(
    tmp_path: Path, keys: Path, capsys: Capsys
) -> None:
    alice = load_private_key(keys / "alice.key", b"ceremony passphrase")
    public = load_public_key(keys / "alice.pub")
    tk = TrustKey(key_id(public), public, "alice")
    now = datetime.now(UTC)  # the CLI reads the real clock
    body = new_root_body(version=1, created=now - 400 * DAY, expires=now - 300 * DAY,
                         keys=[tk], root_keys=[tk.key_id], root_threshold=1,
                         publisher_models={tk.key_id: ("*",)}, publisher_threshold=1)
    path = tmp_path / "old-root.yaml"
    path.write_bytes(encode_envelope(body, sign_root_body(body, [alice])))
    store = tmp_path / "store"
    fingerprint = parse_signed_root(path.read_bytes()).root.fingerprint
    code, _, err = _run(capsys, "--store", store, "trust", "install", path,
                        "--fingerprint", fingerprint)
    assert code == 2 and "ExpiredError" in err and "this host's clock says" in err
    code, _, err = _run(capsys, "--store", store, "trust", "install", path,
                        "--fingerprint", fingerprint, "--allow-expired")
    assert code == 1 and "--reason" in err
    code, _, _ = _run(capsys, "--store", store, "trust", "install", path,
                      "--fingerprint", fingerprint, "--allow-expired", "--reason", "drill")
    assert code == 0
    overrides = [r for r in audit.records(store) if r.kind == "override"]
    assert len(overrides) == 1 and overrides[0].details["reason"] == "drill"
    assert trust_state.installed_root(store) is not None
    code, out, _ = _run(capsys, "--store", store, "trust", "show")
    assert "EXPIRED" in out


def test_show_without_root_and_missing_file(tmp_path: Path, capsys: Capsys) -> None:
    # No store there: said so, nothing created; a store without a root: "do this first".
    code, _, err = _run(capsys, "--store", tmp_path / "empty", "trust", "show")
    assert code == 1 and "StoreNotFoundError" in err and "trust install" in err
    assert not (tmp_path / "empty").exists()
    trust_state.installed_versions(tmp_path / "store")  # an index with no root in it
    code, _, err = _run(capsys, "--store", tmp_path / "store", "trust", "show")
    assert code == 1 and "NoTrustRootError" in err and "appliance trust install" in err
    code, _, err = _run(capsys, "trust", "fingerprint", tmp_path / "nope.yaml")
    assert code == 1
    (tmp_path / "junk.yaml").write_bytes(b"format: something-else\n")
    code, _, err = _run(capsys, "trust", "fingerprint", tmp_path / "junk.yaml")
    assert code == 2 and "FormatError" in err


def test_show_a_file(keys: Path, tmp_path: Path, capsys: Capsys) -> None:
    root1 = tmp_path / "root-1.yaml"
    _run(capsys, *_init(keys, root1, "alice", "bob", extra=("--expires", "30")))
    code, out, _ = _run(capsys, "trust", "show", root1)
    assert code == 0 and "trust root v1 from " in out and "(ok)" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "generate"],
        ["keys", "show"],
        ["trust", "init"],
        ["trust", "rotate"],
        ["trust", "sign"],
        ["trust", "install"],
        ["trust", "fingerprint"],
        ["trust", "show"],
    ],
)
def test_help_teaches(argv: list[str], capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "usage:" in out
    if argv[-1] in ("init", "rotate"):
        assert "PATTERN" in out and "acme/*" in out


def test_keys_show(keys: Path, capsys: Capsys) -> None:
    code, out, _ = _run(capsys, "keys", "show", keys / "alice.pub", keys / "bob.pub")
    assert code == 0 and len(out.splitlines()) == 2
    assert key_id(load_public_key(keys / "bob.pub")) in out.splitlines()[1]
    code, _, err = _run(capsys, "keys", "show", keys / "alice.key")
    assert code == 3 and "KeyFileError" in err


def _recipe(base: Path, sequence: int) -> Path:
    models = base / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "weights.bin").write_bytes(os.urandom(300_000))
    lines = ["channel: site-models", f"sequence: {sequence}", "expires_days: 30", "models:",
             "  - name: acme/tiny", "    version: q4_k_m", "    license: apache-2.0",
             "    files:", "      - path: models/weights.bin"]
    recipe = base / f"recipe-{sequence}.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def test_end_to_end_init_sign_bundle_install_rotate_verify(
    keys: Path, tmp_path: Path, capsys: Capsys
) -> None:
    """keys -> trust init -> bundle build (signed) -> install -> verify -> rotate -> import."""
    store = tmp_path / "site-store"
    root1, root2 = tmp_path / "root-1.yaml", tmp_path / "root-2.yaml"
    assert _run(capsys, *_init(keys, root1, "alice", "bob"))[0] == 0
    fingerprint = _run(capsys, "trust", "fingerprint", root1)[1].strip()

    media1 = tmp_path / "media-1"
    code, _, err = _run(capsys, "bundle", "build", _recipe(tmp_path, 1),
                        "--key", keys / "acme.key", "--trust", root1, "--out", media1)
    assert code == 0, err
    assert _run(capsys, "--store", store, "trust", "install", root1,
                "--fingerprint", fingerprint)[0] == 0
    code, _, err = _run(capsys, "--store", store, "bundle", "verify", media1)
    assert code == 0, err

    # Rotate: dave joins the root keys, ops is revoked as a publisher.
    code, _, err = _run(
        capsys, "trust", "rotate", root1, "--out", root2,
        "--add-key", f"root={keys / 'dave.pub'}", "--remove-key", f"publisher={keys / 'ops.pub'}",
        "--sign-with", keys / "alice.key", keys / "bob.key", keys / "dave.key",
    )
    assert code == 0, err
    media2 = tmp_path / "media-2"
    code, _, err = _run(capsys, "bundle", "build", _recipe(tmp_path, 2),
                        "--key", keys / "acme.key", "--trust", root1, root2, "--out", media2)
    assert code == 0, err
    code, _, err = _run(capsys, "--store", store, "import", media2)
    assert code == 0, err
    assert trust_state.require_root(store).version == 2  # the media's chain was walked
    code, _, err = _run(capsys, "--store", store, "bundle", "verify", media2)
    assert code == 0, err
    code, _, err = _run(capsys, "bundle", "verify", media2, "--trust", root2)
    assert code == 0, err

    # The revoked publisher's bundle verifies under v1 but not once v2 is known.
    media3 = tmp_path / "media-3"
    code, _, err = _run(capsys, "bundle", "build", _recipe(tmp_path, 3),
                        "--key", keys / "ops.key", "--trust", root1, "--out", media3)
    assert code == 0, err
    assert _run(capsys, "bundle", "verify", media3, "--trust", root1)[0] == 0
    code, _, err = _run(capsys, "--store", store, "bundle", "verify", media3)
    assert code == 2 and "ThresholdError" in err
    code, _, err = _run(capsys, "--store", store, "import", media3)
    assert code == 2 and "ThresholdError" in err
    # An older bundle after a newer one: rollback.
    code, _, err = _run(capsys, "--store", store, "import", media1)
    assert code == 2 and "RollbackError" in err
