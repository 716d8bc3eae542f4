"""hf: sources resolve through a Hugging Face cache laid out on disk, with no network.

The cache is what ``hf download`` leaves (blobs named by their etag, snapshots of symlinks,
refs naming commits, ``.no_exist`` markers) and ``huggingface_hub.scan_cache_dir`` reads it as
valid. HF_HUB_OFFLINE is set for every test: nothing here may reach the Hub."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from bundle_helpers import build
from trust_helpers import NOW, trusted_store

from appliance.bundle.recipe import FileSpec, load_recipe
from appliance.bundle.sources import resolve_source
from appliance.errors import IntegrityError, RecipeError, SourceUnavailableError
from appliance.importer import import_media
from appliance.store.records import get_model

hub = pytest.importorskip("huggingface_hub")

COMMIT = "3f5c1c2b0a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f"
OLD_COMMIT = "0123456789abcdef0123456789abcdef01234567"
README = b"# tiny-llm\nA tiny model for tests.\n"


@dataclass(frozen=True)
class Cache:
    root: Path
    repo: Path
    gguf_sha256: str
    readme_blob: str

    def blob(self, name: str) -> Path:
        return self.repo / "blobs" / name


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _snapshot(repo: Path, commit: str, files: dict[str, str]) -> None:
    for name, blob in files.items():
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))


@pytest.fixture
def hf_cache(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Cache:
    """acme/tiny-llm: main and tag v1 at COMMIT (tiny.gguf, README.md), OLD_COMMIT with only
    README.md, and a cached "no such file" for missing.gguf at COMMIT."""
    root = tmp_path / "hf" / "hub"
    repo = root / "models--acme--tiny-llm"
    (repo / "blobs").mkdir(parents=True)
    data = tiny_gguf.read_bytes()
    sha = hashlib.sha256(data).hexdigest()  # an LFS file's etag is its SHA-256
    (repo / "blobs" / sha).write_bytes(data)
    readme = _git_blob_id(README)  # a regular git file's etag is its blob id
    (repo / "blobs" / readme).write_bytes(README)
    _snapshot(repo, COMMIT, {"tiny.gguf": sha, "README.md": readme})
    _snapshot(repo, OLD_COMMIT, {"README.md": readme})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # as huggingface_hub writes it: no newline
    (repo / "refs" / "v1").write_text(COMMIT)
    (repo / ".no_exist" / COMMIT).mkdir(parents=True)
    (repo / ".no_exist" / COMMIT / "missing.gguf").touch()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return Cache(root, repo, sha, readme)


def _recipe(base: Path, *files: str) -> Path:
    recipe = base / "recipe.yaml"
    lines = ["channel: site-models", "sequence: 1", "models:", "  - name: acme/tiny-llm",
             "    version: f16", "    license: apache-2.0", "    files:"]
    recipe.write_text("\n".join([*lines, *(f"      - {f}" for f in files)]) + "\n")
    return recipe


def _spec(base: Path, file: str) -> FileSpec:
    return load_recipe(_recipe(base, file)).models[0].files[0]


def test_the_cache_layout_is_valid_for_huggingface_hub(hf_cache: Cache) -> None:
    info = hub.scan_cache_dir(hf_cache.root)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == "acme/tiny-llm" and repo.repo_type == "model"
    revisions = {r.commit_hash: r for r in repo.revisions}
    assert set(revisions) == {COMMIT, OLD_COMMIT}
    assert revisions[COMMIT].refs == frozenset({"main", "v1"})
    assert {f.file_name for f in revisions[COMMIT].files} == {"tiny.gguf", "README.md"}


def test_a_bundle_from_the_cache_signs_repo_commit_and_upstream_digest(
        tmp_path: Path, hf_cache: Cache, tiny_gguf: Path) -> None:
    recipe = _recipe(tmp_path, "hf: {repo: acme/tiny-llm, file: tiny.gguf}",
                     "hf: acme/tiny-llm/README.md")
    (model,) = build(tmp_path, recipe=recipe).manifest.models
    sources = {s.path: s for s in model.provenance.sources}
    gguf_source = sources["tiny.gguf"]
    assert gguf_source.source == f"hf:acme/tiny-llm@{COMMIT}/tiny.gguf blob={hf_cache.gguf_sha256}"
    assert gguf_source.sha256 == hf_cache.gguf_sha256
    assert sources["README.md"].source == (
        f"hf:acme/tiny-llm@{COMMIT}/README.md blob={hf_cache.readme_blob}")
    store = trusted_store(tmp_path / "store")
    assert import_media(store, [tmp_path / "media"], now=NOW).complete
    files = {f.path: f.location for f in get_model(store, "acme/tiny-llm").files}
    assert files["tiny.gguf"].read_bytes() == tiny_gguf.read_bytes()
    stored = get_model(store, "acme/tiny-llm").provenance["sources"]
    assert f"hf:acme/tiny-llm@{COMMIT}/tiny.gguf blob={hf_cache.gguf_sha256}" in {
        s["source"] for s in stored}


@pytest.mark.parametrize("revision", ["main", "v1", COMMIT, COMMIT[:10]])
def test_every_form_of_revision_resolves_to_the_commit(tmp_path: Path, hf_cache: Cache,
                                                       revision: str) -> None:
    spec = _spec(tmp_path, f"hf: {{repo: acme/tiny-llm, file: tiny.gguf, revision: {revision}}}")
    resolved = resolve_source(spec)
    assert resolved.label.startswith(f"hf:acme/tiny-llm@{COMMIT}/tiny.gguf ")
    assert resolved.upstream_sha256 == hf_cache.gguf_sha256
    assert resolved.local_path == hf_cache.repo / "snapshots" / COMMIT / "tiny.gguf"


def test_hf_hub_cache_overrides_hf_home(tmp_path: Path, hf_cache: Cache,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    moved = tmp_path / "elsewhere"
    hf_cache.root.rename(moved)
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    resolved = resolve_source(_spec(tmp_path, "hf: acme/tiny-llm/tiny.gguf"))
    assert resolved.local_path.is_relative_to(moved)


@pytest.mark.parametrize(("file", "message"), [
    ("hf: acme/tiny-llm/other.gguf", f"commit {COMMIT} is cached but not other.gguf"),
    ("hf: acme/tiny-llm/missing.gguf", "the cache records that acme/tiny-llm has no file"),
    ("hf: acme/absent/tiny.gguf", "the repo is not in the Hugging Face cache"),
    ("hf: {repo: acme/tiny-llm, file: tiny.gguf, revision: v2}", "revision 'v2' is not in"),
    (f"hf: {{repo: acme/tiny-llm, file: tiny.gguf, revision: {OLD_COMMIT}}}",
     f"commit {OLD_COMMIT} is cached but not tiny.gguf"),
    (f"hf: {{repo: acme/tiny-llm, file: tiny.gguf, revision: {COMMIT[:-1]}0}}",
     "is not in the cache"),
])
def test_what_the_cache_lacks_is_a_source_unavailable_error(tmp_path: Path, hf_cache: Cache,
                                                            file: str, message: str) -> None:
    with pytest.raises(SourceUnavailableError, match=message) as caught:
        resolve_source(_spec(tmp_path, file))
    if "no file" not in message:  # says how to get it on a connected machine
        assert "hf download acme/" in str(caught.value)
        assert "download: true" in str(caught.value)


def test_a_missing_file_stops_the_build_before_any_media_is_written(tmp_path: Path,
                                                                     hf_cache: Cache) -> None:
    recipe = _recipe(tmp_path, "hf: acme/tiny-llm/tiny.gguf", "hf: acme/tiny-llm/other.gguf")
    with pytest.raises(SourceUnavailableError):
        build(tmp_path, recipe=recipe)
    assert not (tmp_path / "media").exists()


def test_download_is_refused_while_hf_hub_offline_is_set(tmp_path: Path,
                                                         hf_cache: Cache) -> None:
    spec = _spec(tmp_path, "hf: {repo: acme/tiny-llm, file: other.gguf, download: true}")
    assert spec.download
    with pytest.raises(SourceUnavailableError, match="HF_HUB_OFFLINE is set"):
        resolve_source(spec)


def test_download_is_off_unless_the_recipe_says_so(tmp_path: Path) -> None:
    assert not _spec(tmp_path, "hf: {repo: acme/tiny-llm, file: x.gguf}").download
    assert not _spec(tmp_path, "hf: acme/tiny-llm/x.gguf").download
    for bad in ("download: yes-please", "download: 1", "revision: ../../../etc",
                "revision: /abs", "revision: main/../x"):
        with pytest.raises(RecipeError):
            _spec(tmp_path, f"hf: {{repo: acme/tiny-llm, file: x.gguf, {bad}}}")


def test_a_damaged_lfs_blob_is_refused(tmp_path: Path, hf_cache: Cache) -> None:
    blob = hf_cache.blob(hf_cache.gguf_sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="do not match the upstream digest"):
        build(tmp_path, recipe=_recipe(tmp_path, "hf: acme/tiny-llm/tiny.gguf"))
    assert not (tmp_path / "media").exists()


def test_a_damaged_git_blob_is_refused(tmp_path: Path, hf_cache: Cache) -> None:
    hf_cache.blob(hf_cache.readme_blob).write_bytes(README.upper())
    with pytest.raises(IntegrityError, match="does not match its git blob"):
        resolve_source(_spec(tmp_path, "hf: acme/tiny-llm/README.md"))


def test_quantized_from_the_cache_signs_both_steps(tmp_path: Path, hf_cache: Cache) -> None:
    recipe = _recipe(tmp_path, "hf: {repo: acme/tiny-llm, file: tiny.gguf, revision: v1}\n"
                     "        quantize: Q8_0")
    (model,) = build(tmp_path, recipe=recipe).manifest.models
    (source,) = model.provenance.sources
    assert source.path == "tiny-Q8_0.gguf"
    assert source.source == (
        f"quantize:Q8_0 source_type=F16 source_sha256={hf_cache.gguf_sha256} "
        f"of hf:acme/tiny-llm@{COMMIT}/tiny.gguf blob={hf_cache.gguf_sha256}")
    assert model.gguf is not None and model.gguf.quantization == "Q8_0"


def test_without_huggingface_hub_an_hf_source_is_a_usage_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from appliance.errors import UsageError

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(UsageError, match=r"appliance\[hf\]"):
        resolve_source(_spec(tmp_path, "hf: acme/tiny-llm/tiny.gguf"))


class _FakeHub:
    """The two requests hf_hub_download makes for a plain (non-Xet) LFS file, on loopback:
    HEAD for commit, etag and size, then GET for the bytes. Counts what it served."""

    def __init__(self, data: bytes, commit: str) -> None:
        import http.server
        import threading

        self.data, self.commit, self.gets = data, commit, 0
        hub_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self) -> bool:
                if self.path != "/acme/tiny-llm/resolve/main/tiny.gguf":
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub_self.commit)
                self.send_header("ETag", f'"{hashlib.sha256(hub_self.data).hexdigest()}"')
                self.send_header("Content-Length", str(len(hub_self.data)))
                self.end_headers()
                return True

            def do_HEAD(self) -> None:
                self._headers()

            def do_GET(self) -> None:
                if self._headers():
                    hub_self.gets += 1
                    self.wfile.write(hub_self.data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_download_true_fetches_a_missing_file_once_then_reads_the_cache(
        tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    constants = importlib.import_module("huggingface_hub.constants")
    # The package reads HF_HUB_OFFLINE once, maybe while another test had it set.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake = _FakeHub(tiny_gguf.read_bytes(), COMMIT)
    try:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)  # never the real Hub
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        spec = _spec(tmp_path, "hf: {repo: acme/tiny-llm, file: tiny.gguf, download: true}")
        lines: list[str] = []
        first = resolve_source(spec, notify=lines.append)
        sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
        assert first.label == f"hf:acme/tiny-llm@{COMMIT}/tiny.gguf blob={sha}"
        assert first.local_path.read_bytes() == tiny_gguf.read_bytes()
        assert fake.gets == 1 and len(lines) == 1 and lines[0].startswith("downloading ")
        again = resolve_source(spec, notify=lines.append)  # cached now: no request at all
        assert again == first and fake.gets == 1 and len(lines) == 1
        missing = _spec(tmp_path, "hf: {repo: acme/tiny-llm, file: other.gguf, download: true}")
        with pytest.raises(SourceUnavailableError, match="download failed"):
            resolve_source(missing)
    finally:
        fake.close()


def test_without_hf_variables_the_cache_is_huggingface_hubs_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from appliance.bundle.sources import hf_cache_dir

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    constants = importlib.import_module("huggingface_hub.constants")
    assert hf_cache_dir() == Path(constants.HF_HUB_CACHE)
