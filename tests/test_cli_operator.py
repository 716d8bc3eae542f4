"""What a new operator tripped over in the CLI (issue 21, items 12-16), each through the CLI.

Exit codes follow one rule (``appliance/errors.py``): something not there yet (a key file, a
store, a trust root) is a usage error, exit 1, that says what to do first; a ``--store`` that
is a file says so; read-only commands create no store; a missing model names what is there;
a weak passphrase is warned about; a refused import leaves no progress bar above its error;
an unreachable peer is reported once, and the pull summary speaks MB.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bundle_helpers import CHUNK, make_bundle, model_bytes
from peer_helpers import seed, start_server
from rich.console import Console
from store_helpers import model_entry, write_model
from trust_helpers import make_root, trusted_store

from appliance.cli.main import main
from appliance.cli.store import byte_progress
from appliance.errors import (
    EXIT_ERROR,
    EXIT_USAGE,
    KeyFileError,
    MissingKeyFileError,
    NoTrustRootError,
    StoreError,
    StoreNotFoundError,
    TrustError,
    UsageError,
)
from appliance.keyfiles import PASSPHRASE_ENV
from appliance.store import trust_state
from appliance.store.store import Store

READ_ONLY = (
    ("models", "list"), ("models", "show", "x"), ("models", "rm", "x"), ("audit", "show"),
    ("audit", "verify"), ("store", "verify"), ("store", "gc"), ("trust", "show"),
)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- item 12: exit codes ---------------------------------------------------------------------


def test_the_missing_things_keep_their_family_and_exit_1() -> None:
    assert issubclass(NoTrustRootError, TrustError) and NoTrustRootError.exit_code == EXIT_USAGE
    assert issubclass(MissingKeyFileError, KeyFileError)
    assert issubclass(StoreNotFoundError, StoreError)
    assert MissingKeyFileError.exit_code == StoreNotFoundError.exit_code == EXIT_USAGE


def test_a_missing_key_file_exits_like_a_missing_recipe(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    recipe = tmp_path / "recipe.yaml"
    code, _, err = run(capsys, "bundle", "build", recipe, "--key", tmp_path / "k.key",
                       "--out", tmp_path / "media")
    assert code == EXIT_USAGE  # the recipe is missing: usage
    code, _, err = run(capsys, "keys", "show", tmp_path / "nope.pub")
    assert code == EXIT_USAGE and "MissingKeyFileError" in err and "does not exist" in err
    code, _, err = run(capsys, "trust", "sign", tmp_path / "root.yaml", "--sign-with",
                       tmp_path / "nope.key")
    assert code == EXIT_USAGE


def test_no_trust_root_is_do_this_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    store = tmp_path / "store"
    Store(store).close()
    code, _, err = run(capsys, "--store", store, "bundle", "verify", tmp_path)
    assert code == EXIT_USAGE and "NoTrustRootError" in err
    assert "appliance trust install" in err


def test_store_that_is_a_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a store")
    (tmp_path / "media").mkdir()
    signed = make_root()
    (tmp_path / "root-1.yaml").write_bytes(signed.to_bytes())
    writers = (("import", tmp_path / "media"),
               ("trust", "install", tmp_path / "root-1.yaml", "--fingerprint",
                signed.root.fingerprint))
    for store in (blocker, blocker / "store"):
        for argv in (("models", "list"), ("audit", "show"), *writers):
            code, _, err = run(capsys, "--store", store, *argv)
            assert code == EXIT_ERROR and "StoreError" in err and "Errno" not in err, err
            assert "is not a directory" in err and str(store) in err
    with pytest.raises(StoreError, match="is not a directory"):
        Store(blocker)


@pytest.mark.parametrize("argv", READ_ONLY, ids=" ".join)
def test_read_only_commands_create_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: tuple[str, ...]) -> None:
    store = tmp_path / "typo"
    code, out, err = run(capsys, "--store", store, *argv)
    assert code == EXIT_USAGE and "StoreNotFoundError" in err and "trust install" in err
    assert not store.exists() and out == ""


# --- item 13: a missing model names what is there --------------------------------------------


def test_model_not_found_lists_the_models_and_the_closest(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    store = tmp_path / "store"
    data = b"x" * 1000
    with Store(store) as s:
        for name in ("gemma3-270m", "qwen2-0.5b"):
            write_model(s, model_entry(name, "q4", {"m.gguf": data}), {"m.gguf": data})
    code, _, err = run(capsys, "--store", store, "models", "show", "gemma-3-270m")
    assert code == EXIT_ERROR and "ModelNotFoundError" in err
    assert "did you mean 'gemma3-270m'" in err and "qwen2-0.5b:q4" in err
    assert "appliance models list" in err
    code, _, err = run(capsys, "--store", store, "models", "show", "zzz")
    assert "did you mean" not in err and "gemma3-270m:q4, qwen2-0.5b:q4" in err
    empty = tmp_path / "empty"
    Store(empty).close()
    code, _, err = run(capsys, "--store", empty, "models", "show", "x")
    assert "holds no models yet" in err


# --- item 14: weak passphrases ---------------------------------------------------------------


@pytest.mark.parametrize(("passphrase", "weak"), [
    ("short1!", True), ("sunflowers", True), ("Rhododendrons", True),
    ("ocean tiger violet", False), ("correct horse battery staple", False),
    ("r7#Kq9!mZ2@x", False),
])
def test_weak_passphrase_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, passphrase: str,
                                         weak: bool) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, passphrase)
    code, _, err = run(capsys, "keys", "generate", "k", "--out", tmp_path)
    assert code == 0 and (tmp_path / "k.key").exists()  # a warning, not a refusal
    assert ("weak passphrase" in err) is weak
    if weak:
        assert "six or more random words" in err and "keys/README.md" in err


# --- item 15: a refused import leaves no progress line ---------------------------------------


@pytest.mark.parametrize("terminal", [True, False])
def test_the_bar_of_failed_work_is_cleared(terminal: bool) -> None:
    def run_bar(fail: bool) -> str:
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=terminal, width=80)
        expected = pytest.raises(UsageError) if fail else contextlib.nullcontext()
        with expected, byte_progress("importing", console=console) as progress:
            progress(10, 100)
            if fail:
                raise UsageError("refused")
        return buf.getvalue()

    assert "10/100" in run_bar(fail=False)  # a finished bar stays, as before
    failed = run_bar(fail=True)
    if terminal:  # drawn, then the line erased and the cursor put back
        assert failed.endswith("\x1b[2K")
    else:
        assert failed == ""


def test_refused_import_prints_only_the_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    media = tmp_path / "media"
    media.mkdir()
    store = trusted_store(tmp_path / "store")
    code, out, err = run(capsys, "--store", store, "import", media)
    assert code != 0 and out == ""
    assert err.startswith("appliance: ") and len(err.strip().splitlines()) == 1, err


# --- item 16: peer pull reports once and in MB -----------------------------------------------


def test_an_unreachable_peer_is_reported_once(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store = trusted_store(tmp_path / "b")
    url = "http://127.0.0.1:9"
    code, _, err = run(capsys, "--store", store, "peer", "pull", "tiny", "--from", url,
                       "--insecure", "--no-mdns")
    assert code == EXIT_ERROR and "PeerError" in err
    assert err.count(url) == 2, err  # "no peer answered: URL: cannot connect to URL"
    assert "did not answer" not in err


@pytest.fixture
def seeded_peer(tmp_path: Path) -> Iterator[str]:
    bundle = make_bundle({"tiny": {"model.gguf": model_bytes(7, 40 * CHUNK)}})
    seed(trusted_store(tmp_path / "a"), bundle)
    server = start_server(tmp_path / "a")
    try:
        yield server.url
    finally:
        server.stop()


def test_pull_summary_speaks_mb_and_names_a_dead_peer_once(
        tmp_path: Path, seeded_peer: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = trusted_store(tmp_path / "b")
    dead = "http://127.0.0.1:9"
    code, out, err = run(capsys, "--store", store, "peer", "pull", "tiny", "--from",
                         seeded_peer, "--from", dead, "--insecure", "--no-mdns")
    assert code == 0, err
    assert "pulled tiny:1" in out and "655.4 KB from peers" in out
    assert f"{seeded_peer}: 655.4 KB" in out and " bytes" not in out
    assert [line for line in (err + out).splitlines() if dead in line] == [
        f"peer {dead} did not answer: cannot connect to {dead}: [Errno 111] Connection refused"]


# --- audit user: the CLI and the TUI name the same one ---------------------------------------


def test_serve_and_trust_records_name_the_same_user(tmp_path: Path) -> None:
    from appliance.serve.store_resolver import serve_audit
    from appliance.store import audit

    store = tmp_path / "store"
    signed = make_root()
    trust_state.install_roots(store, [signed], signed.root.fingerprint,
                              datetime(2030, 6, 1, tzinfo=UTC))
    for via in ("cli", "tui"):
        serve_audit(store, via=via)("serve-start", {"models": ["m"]})
    users = {(r.kind, r.details.get("via")): r.details["user"] for r in audit.records(store)}
    assert set(users.values()) == {trust_state.who()}
    assert set(users) == {("trust-install", None), ("serve-start", "cli"),
                          ("serve-start", "tui")}
