"""End to end through a real CNCF Distribution registry and skopeo: push, copy, pull, refuse.

Distribution 2.8 (Debian's docker-registry) has no referrers API, so these tests also cover
the tag-schema fallback; skopeo is the independent client that must see and move the
artifact. Every refusal asserts its exact class and that nothing was published.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from bundle_helpers import NOW, build, flip_byte, write_recipe
from importer_helpers import check_consistent
from oci_helpers import (
    MODEL,
    SKOPEO_BIN,
    RunningRegistry,
    make_site,
    needs_registry,
    needs_skopeo,
    run_pull_child,
    running_registry,
    skopeo,
)
from trust_helpers import sign_manifest

from appliance.cli.main import main
from appliance.errors import (
    ExpiredError,
    IntegrityError,
    RollbackError,
    SignatureError,
    ThresholdError,
)
from appliance.importer import import_media
from appliance.oci import mapping
from appliance.oci.layout import OciLayout
from appliance.oci.pull import pull
from appliance.oci.push import PushResult, media_model, push, store_model
from appliance.oci.registry import Registry, parse_reference
from appliance.store import audit
from appliance.store.records import list_models

pytestmark = needs_registry
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["oci_helpers", "appliance.oci.pull"])


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    yield from running_registry(tmp_path / "registry")


@pytest.fixture
def registry2(tmp_path: Path) -> Iterator[RunningRegistry]:
    yield from running_registry(tmp_path / "registry2")


def _registry(running: RunningRegistry, tag: str = "q4") -> Registry:
    return Registry(parse_reference(f"{running.host}/acme/tiny:{tag}"), plain_http=True)


def _push_store(store: Path, running: RunningRegistry, tag: str = "q4") -> PushResult:
    with _registry(running, tag) as target:
        return push(store_model(store, MODEL), target, tag)


def _published(store: Path) -> list[str]:
    return [m.ref for m in list_models(store) if m.verified]


def _files(store: Path) -> dict[str, bytes]:
    (model,) = list_models(store)
    return {f.path: f.location.read_bytes() for f in model.files}


@needs_skopeo
def test_push_skopeo_copy_through_a_layout_to_a_second_registry_then_pull(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry,
        registry2: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf)
    pushed = _push_store(site.publisher, registry)
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                            f"docker://{registry.host}/acme/tiny:q4").stdout)
    assert raw["artifactType"] == mapping.MODEL_ARTIFACT
    assert raw["config"]["mediaType"] == mapping.MODEL_CONFIG
    assert {layer["annotations"][mapping.FILEPATH]: layer["mediaType"]
            for layer in raw["layers"]} == {"tiny.gguf": mapping.WEIGHT_RAW,
                                            "weights.bin": mapping.WEIGHT_RAW}
    layout = tmp_path / "layout"
    assert pushed.referrers_tag is not None  # Distribution 2.8: no referrers API
    for tag in ("q4", pushed.referrers_tag):
        skopeo("copy", "--all", "--src-tls-verify=false",
               f"docker://{registry.host}/acme/tiny:{tag}", f"oci:{layout}:{tag}")
        skopeo("copy", "--all", "--dest-tls-verify=false",
               f"oci:{layout}:{tag}", f"docker://{registry2.host}/acme/tiny:{tag}")
    with _registry(registry2) as second:
        result = pull(site.receiver, second, "q4", now=NOW)
    assert result.complete and result.published == (MODEL,)
    assert result.manifest_digest == pushed.manifest_digest  # skopeo kept the bytes
    assert _files(site.receiver) == _files(site.publisher)
    check_consistent(site.receiver)


def test_push_from_media_and_pull_from_an_oci_layout_via_the_cli(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry,
        capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path, tiny_gguf)
    layout = tmp_path / "layout"
    assert main(["--store", str(site.publisher), "oci", "push", str(site.media),
                 "--oci-layout", str(layout), "--json"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["tag"] == "q4_k_m" and pushed["referrers_tag"]
    assert main(["--store", str(site.receiver), "oci", "pull", "q4_k_m",
                 "--oci-layout", str(layout), "--json"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["ok"] and pulled["published"] == [{"name": "acme/tiny", "version": "q4_k_m"}]
    assert _files(site.receiver) == _files(site.publisher)
    # The same artifact from media and from the store is byte-identical: one digest.
    with _registry(registry) as target:
        from_media = push(media_model([site.media], None, NOW), target, "q4")
    assert from_media.manifest_digest == pushed["manifest_digest"]
    assert _push_store(site.publisher, registry).uploaded_bytes == 0  # blobs already there


def test_a_corrupt_blob_in_registry_storage_is_refused_naming_the_chunk(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf)
    pushed = _push_store(site.publisher, registry)
    manifest = json.loads(pushed_manifest(registry, pushed))
    weights = next(layer for layer in manifest["layers"]
                   if layer["annotations"][mapping.FILEPATH] == "weights.bin")
    flip_byte(registry.blob_file(weights["digest"]), weights["size"] // 2)
    with _registry(registry) as target, pytest.raises(IntegrityError) as refused:
        pull(site.receiver, target, "q4", now=NOW)
    assert refused.value.chunk is not None
    assert refused.value.file == f"{MODEL}/weights.bin"
    assert _published(site.receiver) == []
    check_consistent(site.receiver)


def pushed_manifest(running: RunningRegistry, pushed: PushResult) -> bytes:
    with _registry(running) as target:
        got = target.get_manifest(pushed.manifest_digest)
    assert got is not None
    return got[0]


def test_an_older_sequence_is_refused_as_rollback(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf)
    newer = build(tmp_path, recipe=write_recipe(tmp_path, files=("tiny.gguf", "weights.bin"),
                                                sequence=2), out="media-2")
    assert newer.manifest_hash
    import_media(site.receiver, [tmp_path / "media-2"], now=NOW)
    _push_store(site.publisher, registry)  # sequence 1
    with _registry(registry) as target, pytest.raises(RollbackError):
        pull(site.receiver, target, "q4", now=NOW)


def test_a_referrer_signed_by_an_untrusted_key_is_refused(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf)
    honest = store_model(site.publisher, MODEL)
    forged = dataclasses.replace(honest, signatures=tuple(
        sign_manifest(honest.manifest_bytes, "mallory")))
    with _registry(registry) as target:
        push(forged, target, "q4")
        with pytest.raises(ThresholdError):
            pull(site.receiver, target, "q4", now=NOW)
    assert _published(site.receiver) == []


def test_an_artifact_without_a_signature_referrer_is_refused(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf)
    pushed = _push_store(site.publisher, registry)
    with _registry(registry) as target:
        target.put_manifest(pushed.referrers_tag or "", mapping.index([]), mapping.OCI_INDEX)
        with pytest.raises(SignatureError, match="no signature referrer"):
            pull(site.receiver, target, "q4", now=NOW)


def test_sigkill_mid_pull_resumes_without_fetching_durable_chunks_again(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf, random_mib=24)  # 6 chunks of 4 MiB
    _push_store(site.publisher, registry)
    landed = CONTEXT.Event()
    child = CONTEXT.Process(target=run_pull_child,
                            args=(str(site.receiver), registry.host, "q4", landed))
    child.start()
    try:
        assert landed.wait(timeout=30), "the pull child never landed a chunk"
        os.kill(child.pid or 0, signal.SIGKILL)
    finally:
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    assert _published(site.receiver) == []
    check_consistent(site.receiver)
    with _registry(registry) as target:
        result = pull(site.receiver, target, "q4", now=NOW)
    assert result.complete and result.already_done_bytes > 0
    assert result.fetched_bytes + result.already_done_bytes == result.total_bytes
    assert _files(site.receiver) == _files(site.publisher)


def test_layout_written_by_push_is_a_valid_layout_for_skopeo(
        tmp_path: Path, tiny_gguf: Path) -> None:
    site = make_site(tmp_path, tiny_gguf)
    layout = OciLayout(tmp_path / "layout", create=True)
    pushed = push(store_model(site.publisher, MODEL), layout, "q4")
    assert layout.referrers(pushed.manifest_digest, mapping.SIGNATURE_ARTIFACT)
    if SKOPEO_BIN is None:
        return
    raw = json.loads(skopeo("inspect", "--raw", f"oci:{tmp_path / 'layout'}:q4").stdout)
    assert raw["artifactType"] == mapping.MODEL_ARTIFACT


def test_a_forged_referrer_beside_the_honest_one_does_not_block_the_pull(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf)
    honest = store_model(site.publisher, MODEL)
    forged = dataclasses.replace(honest, signatures=tuple(
        sign_manifest(honest.manifest_bytes, "mallory")))
    with _registry(registry) as target:
        first = push(forged, target, "q4")
        second = push(honest, target, "q4")
        assert first.manifest_digest == second.manifest_digest
        assert first.signature_digest != second.signature_digest
        result = pull(site.receiver, target, "q4", now=NOW)
    assert result.signature_digest == second.signature_digest
    assert _published(site.receiver) == [MODEL]


def test_an_expired_bundle_needs_the_audited_override(
        tmp_path: Path, tiny_gguf: Path, registry: RunningRegistry) -> None:
    site = make_site(tmp_path, tiny_gguf, expires_days=30)
    _push_store(site.publisher, registry)
    later = NOW + timedelta(days=60)
    with _registry(registry) as target:
        with pytest.raises(ExpiredError):
            pull(site.receiver, target, "q4", now=later)
        result = pull(site.receiver, target, "q4", now=later, allow_expired=True,
                      reason="site clock test")
    assert result.expired_override and result.complete
    kinds = [r.kind for r in audit.records(site.receiver)]
    assert "override" in kinds and "refusal" in kinds
