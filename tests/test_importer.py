"""Importing bundles: authentication first, any volume order, resume, local dedup, audit."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from bundle_helpers import (
    NOW,
    build,
    flip_byte,
    make_sources,
    rewrite_manifest,
    trusted,
    write_recipe,
)
from importer_helpers import check_consistent, tree_digest
from trust_helpers import make_root, trusted_store

from appliance.bundle import build_plan
from appliance.bundle.verify import verify_media
from appliance.errors import (
    ExpiredError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    MissingVolumeError,
    NoTrustRootError,
    RollbackError,
    SignatureError,
    StoreError,
    ThresholdError,
    TruncatedError,
    UnsafePathError,
    UsageError,
)
from appliance.importer import import_media
from appliance.limits import Limits
from appliance.store import audit, trust_state
from appliance.store.db import connect
from appliance.store.records import get_model, list_models
from appliance.store.scrub import verify_store

MIB = 1 << 20


@pytest.fixture(scope="module")
def two_volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build directory: ``models/`` (weights 16 MiB, notes) and ``media/``, the bundle of
    acme/tiny:q4_k_m split over two volumes."""
    base = tmp_path_factory.mktemp("bundle")
    make_sources(base, random_mib=16)
    build(base, volume_size=14 * MIB)
    return base


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return trusted_store(tmp_path / "store")


def kinds(store: Path) -> list[str]:
    return [r.kind for r in audit.records(store)]


def test_import_publishes_verified_files_and_never_touches_media(two_volumes: Path,
                                                                  store: Path) -> None:
    before = tree_digest(two_volumes / "media")
    result = import_media(store, [two_volumes / "media"], now=NOW)
    assert tree_digest(two_volumes / "media") == before
    assert result.complete and result.published == ("acme/tiny:q4_k_m",)
    assert result.volumes_used == ("vol-001", "vol-002")
    assert result.media_bytes == result.total_bytes and result.local_bytes == 0
    model = get_model(store, "acme/tiny")
    for f in model.files:
        assert f.location.read_bytes() == (two_volumes / "models" / f.path).read_bytes()
    assert model.channel == "site-models" and model.sequence == 1 and model.signers
    assert kinds(store) == ["trust-install", "import"]
    assert audit.verify(store) == 2
    assert verify_store(store).ok
    check_consistent(store)


def test_volumes_one_at_a_time_last_first(two_volumes: Path, store: Path) -> None:
    volumes = sorted((two_volumes / "media").glob("vol-*"))
    assert len(volumes) == 2
    first = import_media(store, [volumes[1]], now=NOW)
    assert not first.complete and first.pending == ("acme/tiny:q4_k_m",)
    assert first.volumes_needed == ("vol-001",) and first.media_bytes > 0
    assert list_models(store) == []  # nothing half-written is listed
    check_consistent(store)
    second = import_media(store, [volumes[1], volumes[0]], now=NOW)
    assert second.complete and second.already_done_bytes == first.media_bytes
    assert first.media_bytes + second.media_bytes == second.total_bytes
    assert [m.ref for m in list_models(store)] == ["acme/tiny:q4_k_m"]
    assert get_model(store, "acme/tiny").verified
    check_consistent(store)


def test_importing_again_reads_nothing(two_volumes: Path, store: Path) -> None:
    import_media(store, [two_volumes / "media"], now=NOW)
    again = import_media(store, [two_volumes / "media"], now=NOW)
    assert again.complete and again.present == ("acme/tiny:q4_k_m",)
    assert again.media_bytes == 0 and again.published == ()


def test_chunks_held_by_another_model_are_copied_locally(
    two_volumes: Path, store: Path, tmp_path: Path
) -> None:
    import_media(store, [two_volumes / "media"], now=NOW)
    base = tmp_path / "second"
    shutil.copytree(two_volumes / "models", base / "models")
    recipe = write_recipe(base, name="acme/tiny-copy", sequence=2)
    build(base, recipe=recipe)
    result = import_media(store, [base / "media"], now=NOW)
    assert result.complete and result.media_bytes == 0
    assert result.local_bytes == result.total_bytes
    copy = get_model(store, "acme/tiny-copy")
    assert copy.path.read_bytes() == get_model(store, "acme/tiny").path.read_bytes()


def test_older_sequence_is_refused_and_audited(two_volumes: Path, store: Path,
                                               tmp_path: Path) -> None:
    base = tmp_path / "newer"
    make_sources(base, random_mib=1)
    build(base, recipe=write_recipe(base, sequence=5))
    import_media(store, [base / "media"], now=NOW)
    with pytest.raises(RollbackError, match="older"):
        import_media(store, [two_volumes / "media"], now=NOW)
    assert kinds(store)[-1] == "refusal"
    assert [m.sequence for m in list_models(store)] == [5]


def test_same_sequence_with_other_bytes_is_refused(
    two_volumes: Path, store: Path, tmp_path: Path
) -> None:
    import_media(store, [two_volumes / "media"], now=NOW)
    base = tmp_path / "other"
    make_sources(base, random_mib=1)
    build(base, recipe=write_recipe(base, name="acme/other", sequence=1))
    with pytest.raises(RollbackError, match="another manifest"):
        import_media(store, [base / "media"], now=NOW)
    assert [m.name for m in list_models(store)] == ["acme/tiny"]


def test_expired_bundle_needs_an_audited_override(two_volumes: Path, store: Path) -> None:
    later = NOW + timedelta(days=31)
    with pytest.raises(ExpiredError):
        import_media(store, [two_volumes / "media"], now=later)
    assert kinds(store)[-1] == "refusal"
    with pytest.raises(UsageError, match="--reason"):
        import_media(store, [two_volumes / "media"], now=later, allow_expired=True)
    result = import_media(
        store, [two_volumes / "media"], now=later, allow_expired=True, reason="clock is right, ok"
    )
    assert result.complete and result.expired_override
    override = [r for r in audit.records(store) if r.kind == "override"]
    assert len(override) == 1 and override[0].details["reason"] == "clock is right, ok"
    assert audit.verify(store) == len(kinds(store))


def test_a_key_revoked_while_the_import_runs_cannot_publish(two_volumes: Path, store: Path) -> None:
    """Issue 14 item 6: trust is checked again before publishing, against the root in force."""
    revoked = make_root(version=2, publishers={"p2": ("*",)})  # p1, the bundle's signer, goes
    rotated: list[int] = []

    def rotate_midway(done: int, total: int) -> None:
        if done and not rotated:
            trust_state.update_root(store, [revoked], NOW)
            rotated.append(done)

    with pytest.raises(ThresholdError) as info:
        import_media(store, [two_volumes / "media"], now=NOW, progress=rotate_midway)
    assert type(info.value) is ThresholdError
    assert rotated and rotated[0] < bundle_size(two_volumes)
    assert list_models(store) == [] and list((store / "models").iterdir()) == []
    assert kinds(store)[-2:] == ["trust-update", "refusal"]
    assert verify_store(store).ok and audit.verify(store) == len(kinds(store))
    check_consistent(store)


def bundle_size(build_dir: Path) -> int:
    return sum(p.stat().st_size for p in (build_dir / "models").iterdir())


def test_store_without_a_trust_root_refuses(two_volumes: Path, tmp_path: Path) -> None:
    with pytest.raises(NoTrustRootError):
        import_media(tmp_path / "bare", [two_volumes / "media"], now=NOW)


def copy_media(build_dir: Path, tmp_path: Path) -> Path:
    media = tmp_path / "media"
    shutil.copytree(build_dir / "media", media)
    return media


def assert_nothing_stored(store: Path) -> None:
    assert list_models(store, include_importing=True) == []
    assert list((store / "staging").iterdir()) == []
    assert list((store / "models").iterdir()) == []


def test_tampered_manifest_is_refused_before_any_byte(
    two_volumes: Path, store: Path, tmp_path: Path
) -> None:
    media = copy_media(two_volumes, tmp_path)
    for volume in media.glob("vol-*"):
        flip_byte(volume / "manifest.yaml", 40)
    with pytest.raises(SignatureError):
        import_media(store, [media], now=NOW)
    assert_nothing_stored(store)
    assert kinds(store)[-1] == "refusal"


def test_bundle_signed_by_an_unknown_key_is_refused(
    two_volumes: Path, store: Path, tmp_path: Path
) -> None:
    media = copy_media(two_volumes, tmp_path)
    data = (media / "vol-001" / "manifest.yaml").read_bytes()
    rewrite_manifest(media, data, signers=("stranger",))
    with pytest.raises(ThresholdError):
        import_media(store, [media], now=NOW)
    assert_nothing_stored(store)


def test_flipped_chunk_is_refused_and_the_import_resumes_from_good_media(
    two_volumes: Path, store: Path, tmp_path: Path
) -> None:
    media = copy_media(two_volumes, tmp_path)
    pack = sorted((media / "vol-002" / "packs").iterdir())[0]
    flip_byte(pack, 1000)
    with pytest.raises(IntegrityError) as info:
        import_media(store, [media], now=NOW)
    assert info.value.volume == "vol-002"
    assert list_models(store) == []
    assert kinds(store)[-1] == "refusal"
    check_consistent(store)
    result = import_media(store, [two_volumes / "media"], now=NOW)
    assert result.complete and result.already_done_bytes > 0
    assert verify_store(store).ok


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Many volumes (two 4 MiB chunks each), so the last is read well after copying began."""
    base = tmp_path_factory.mktemp("wide")
    make_sources(base, random_mib=32)
    build(base, volume_size=14 * MIB)
    return base


def test_volume_pulled_mid_import_is_resumable(wide: Path, store: Path, tmp_path: Path) -> None:
    media = copy_media(wide, tmp_path)
    last = sorted(media.glob("vol-*"))[-1]
    assert last.name >= "vol-004"
    pulled = tmp_path / "pulled"

    def pull(done: int, total: int) -> None:
        if done > 0 and last.exists():
            last.rename(pulled)

    with pytest.raises(MissingVolumeError, match=last.name):
        import_media(store, [media], now=NOW, progress=pull)
    check_consistent(store)
    assert list_models(store) == []
    pulled.rename(last)
    seen: list[tuple[int, int]] = []
    result = import_media(store, [media], now=NOW, progress=lambda d, t: seen.append((d, t)))
    assert result.complete and result.already_done_bytes > 0
    assert seen[0][0] == result.already_done_bytes and seen[-1] == (result.total_bytes,) * 2
    assert verify_store(store).ok


def test_conflicting_model_is_refused_before_anything_changes(
    two_volumes: Path, store: Path, tmp_path: Path
) -> None:
    import_media(store, [two_volumes / "media"], now=NOW)
    base = tmp_path / "changed"
    make_sources(base, random_mib=2)
    build(base, recipe=write_recipe(base, sequence=2))
    with pytest.raises(StoreError, match="models rm"):
        import_media(store, [base / "media"], now=NOW)
    assert list((store / "staging").iterdir()) == []


def _flip_signature(media: Path) -> None:
    for sig in media.glob("vol-*/signatures/*.sig"):
        text = sig.read_bytes()
        sig.write_bytes(text[:-10] + (b"A" if text[-10:-9] != b"A" else b"B") + text[-9:])


def _flip_index(media: Path) -> None:
    flip_byte(media / "vol-002" / "index.bin", 100)


def _truncate_pack(media: Path) -> None:
    pack = sorted((media / "vol-001" / "packs").iterdir())[0]
    with pack.open("r+b") as f:
        f.truncate(pack.stat().st_size - 1)


def _pad_pack(media: Path) -> None:
    pack = sorted((media / "vol-001" / "packs").iterdir())[0]
    with pack.open("ab") as f:
        f.write(b"\0" * 10)


def _unsafe_path(media: Path) -> None:
    data = (media / "vol-001" / "manifest.yaml").read_bytes()
    rewrite_manifest(media, data.replace(b"path: notes.txt\n", b"path: ../notes.txt\n", 1))


def _duplicate_path(media: Path) -> None:
    data = (media / "vol-001" / "manifest.yaml").read_bytes()
    rewrite_manifest(media, data.replace(b"path: notes.txt\n", b"path: weights.bin\n", 1))


def _lying_size(media: Path) -> None:
    data = (media / "vol-001" / "manifest.yaml").read_bytes()
    rewrite_manifest(media, data.replace(b"size: 600000\n", b"size: 600001\n", 1))


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (_flip_signature, ThresholdError),
        (_flip_index, FormatError),
        (_truncate_pack, TruncatedError),
        (_pad_pack, FormatError),
        (_unsafe_path, UnsafePathError),
        (_duplicate_path, UnsafePathError),
        (_lying_size, FormatError),
    ],
)
def test_hostile_media_is_refused_before_any_byte_reaches_the_store(
    two_volumes: Path,
    store: Path,
    tmp_path: Path,
    tamper: Callable[[Path], None],
    error: type[Exception],
) -> None:
    media = copy_media(two_volumes, tmp_path)
    tamper(media)
    with pytest.raises(error) as info:
        import_media(store, [media], now=NOW)
    assert type(info.value) is error
    assert_nothing_stored(store)
    assert kinds(store)[-1] == "refusal"


@pytest.mark.parametrize(("tamper", "error"), [(_pad_pack, FormatError),
                                               (_truncate_pack, TruncatedError)])
def test_pack_size_check_is_the_same_in_verify_and_import(
    two_volumes: Path, store: Path, tmp_path: Path, tamper: Callable[[Path], None],
    error: type[Exception],
) -> None:
    """One pre-check (``reader.check_pack_sizes``): longer is FormatError, shorter Truncated."""
    media = copy_media(two_volumes, tmp_path)
    tamper(media)
    with pytest.raises(error) as verified:
        verify_media([media], trusted(), NOW)
    with pytest.raises(error) as imported:
        import_media(store, [media], now=NOW)
    assert type(verified.value) is type(imported.value) is error
    assert str(verified.value) == str(imported.value)


def test_many_tiny_chunks_are_recorded_every_n_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 item 9: with chunks far below ``flush_bytes``, progress still reaches the
    index every ``flush_chunks`` chunks, so a SIGKILL loses a bounded number of them."""
    monkeypatch.setattr(build_plan, "TARGET_CHUNK_BYTES", 4096)
    base = tmp_path / "tiny-chunks"
    make_sources(base, random_mib=1)
    build(base, recipe=write_recipe(base, files=("weights.bin",)))
    store = trusted_store(tmp_path / "store")
    lag: list[int] = []  # chunks written but not yet marked done, after each chunk

    def watch(done: int, total: int) -> None:
        db = connect(store)
        try:
            durable = db.execute("SELECT COUNT(*) FROM chunks WHERE done = 1").fetchone()[0]
        finally:
            db.close()
        lag.append(done // 4096 - durable)

    flush_chunks = 16
    result = import_media(store, [base / "media"], now=NOW, progress=watch,
                          flush_chunks=flush_chunks)
    assert result.complete and result.total_bytes == MIB and len(lag) == MIB // 4096 + 1
    # At most one batch being synced plus one filling: never the whole file (256 chunks).
    assert max(lag) <= 2 * flush_chunks
    assert verify_store(store).ok


def test_manifest_over_the_size_cap_is_refused(two_volumes: Path, store: Path) -> None:
    with pytest.raises(LimitExceededError):
        import_media(store, [two_volumes / "media"], now=NOW,
                     limits=Limits(max_manifest_bytes=1000))
    assert_nothing_stored(store)
