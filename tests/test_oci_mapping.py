"""The pure OCI mapping, references, credentials and the auth flow (httpx MockTransport seam)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
from bundle_helpers import make_bundle
from store_helpers import model_entry

from appliance.errors import FormatError, LimitExceededError, PeerError, UsageError
from appliance.format.manifest import GgufInfo
from appliance.oci import mapping
from appliance.oci.registry import (
    Credentials,
    Registry,
    authfile_credentials,
    is_loopback,
    parse_reference,
)


def test_param_size_follows_modelpack_count_and_scale() -> None:
    assert mapping.param_size(268_098_176) == "268.1M"
    assert mapping.param_size(7_000_000_000) == "7B"
    assert mapping.param_size(6_738_415_616) == "6.7B"
    assert mapping.param_size(1500) == "1.5K"
    assert mapping.param_size(None) is None


def test_layer_media_types_by_file_kind() -> None:
    assert mapping.layer_media_type("model.gguf") == mapping.WEIGHT_RAW
    assert mapping.layer_media_type("sub/LICENSE") == mapping.DOC_RAW
    assert mapping.layer_media_type("README.md") == mapping.DOC_RAW
    assert mapping.layer_media_type("tokenizer.json") == mapping.WEIGHT_CONFIG_RAW


def test_config_carries_the_signed_gguf_facts() -> None:
    bundle = make_bundle({"acme/m": {"m.gguf": b"x" * 1000}})
    model = bundle.manifest.models[0]
    facts = GgufInfo("gemma3", "F16", 268_098_176, 32768, 236, None)
    model = model.__class__(**{**model.__dict__, "gguf": facts})
    config = json.loads(mapping.model_config(bundle.manifest, model, ["sha256:" + "a" * 64]))
    assert config["config"] == {"architecture": "gemma3", "format": "gguf",
                                "paramSize": "268.1M", "quantization": "F16",
                                "precision": "float16"}
    assert config["modelfs"] == {"type": "layers", "diffIds": ["sha256:" + "a" * 64]}
    assert config["descriptor"]["name"] == "acme/m"
    # A block quantization has no single ModelPack precision: quantization says it.
    quant = model.__class__(**{**model.__dict__,
                               "gguf": GgufInfo("llama", "Q4_K_M", 10**9, None, 3, None)})
    assert "precision" not in json.loads(
        mapping.model_config(bundle.manifest, quant, []))["config"]


def test_model_manifest_round_trips_and_names_each_file() -> None:
    entry = model_entry("acme/m", "1", {"a.gguf": b"a" * 10, "b.bin": b"b" * 5})
    layers = [mapping.Descriptor(mapping.layer_media_type(f.path), "sha256:" + "c" * 64,
                                 f.size, {mapping.FILEPATH: f.path}) for f in entry.files]
    config = mapping.blob_descriptor(mapping.MODEL_CONFIG, b"{}")
    parsed = mapping.parse_manifest(mapping.model_manifest(config, layers, {"k": "v"}))
    assert parsed.artifact_type == mapping.MODEL_ARTIFACT
    assert {p: d.size for p, d in mapping.model_layers(parsed).items()} == {"a.gguf": 10,
                                                                           "b.bin": 5}


def test_hostile_oci_json_is_refused() -> None:
    with pytest.raises(FormatError, match="duplicate key"):
        mapping.parse_json(b'{"a": 1, "a": 2}', "x")
    with pytest.raises(LimitExceededError):
        mapping.parse_json(b" " * (mapping.MAX_OCI_JSON_BYTES + 1), "x")
    bad = {"schemaVersion": 2, "config": {"mediaType": "x", "size": 2,
                                          "digest": "sha256:../../etc/passwd"}, "layers": []}
    with pytest.raises(FormatError, match="not a sha256 digest"):
        mapping.parse_manifest(json.dumps(bad).encode())
    config = mapping.blob_descriptor(mapping.MODEL_CONFIG, b"{}")
    layer = mapping.Descriptor(mapping.WEIGHT_RAW, config.digest, 2, {mapping.FILEPATH: "a"})
    twice = mapping.parse_manifest(mapping.model_manifest(config, [layer, layer], {}))
    with pytest.raises(FormatError, match="two layers"):
        mapping.model_layers(twice)


def test_references() -> None:
    ref = parse_reference("registry.site:5000/models/tiny:q4_k_m")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "registry.site:5000", "models/tiny", "q4_k_m", None)
    pinned = parse_reference("127.0.0.1:5000/a/b@sha256:" + "0" * 64)
    assert pinned.reference == "sha256:" + "0" * 64
    for bad in ("tiny:q4", "models/tiny:q4", "host.site/Upper:x", "host.site/a@sha256:12"):
        with pytest.raises(UsageError):
            parse_reference(bad)
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:5")
    assert not is_loopback("registry.site:5000")


def test_plain_http_only_to_loopback() -> None:
    with pytest.raises(UsageError, match="loopback"):
        Registry(parse_reference("registry.site:5000/a/b:c"), plain_http=True)


def test_docker_config_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    authfile = tmp_path / "config.json"
    encoded = base64.b64encode(b"alice:s3cret:with:colons").decode()
    authfile.write_text(json.dumps({"auths": {"https://registry.site:5000/v1/": {
        "auth": encoded}, "other.site": {"username": "bob", "password": "pw"}}}))
    assert authfile_credentials("registry.site:5000", authfile) == Credentials(
        "alice", "s3cret:with:colons")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
    assert authfile_credentials("other.site") == Credentials("bob", "pw")
    assert authfile_credentials("third.site") is None
    with pytest.raises(UsageError, match="does not exist"):
        authfile_credentials("x.site", tmp_path / "missing.json")


def _token_registry(seen: list[httpx.Request]) -> httpx.MockTransport:
    """A registry that wants a bearer token from its realm, which wants basic auth."""
    good_basic = Credentials("alice", "pw").basic()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/token":
            if request.headers.get("authorization") != good_basic:
                return httpx.Response(401)
            assert request.url.params["scope"] == "repository:a/b:pull"
            assert request.url.params["service"] == "reg"
            return httpx.Response(200, json={"token": "T0K"})
        if request.headers.get("authorization") != "Bearer T0K":
            return httpx.Response(401, headers={"WWW-Authenticate": (
                'Bearer realm="https://auth.site/token",service="reg",'
                'scope="repository:a/b:pull"')})
        return httpx.Response(200, content=b"{}")

    return httpx.MockTransport(handler)


def test_bearer_token_flow_with_basic_credentials_to_the_realm() -> None:
    seen: list[httpx.Request] = []
    ref = parse_reference("registry.site/a/b:c")
    with Registry(ref, credentials=Credentials("alice", "pw"),
                  transport=_token_registry(seen)) as registry:
        assert registry.get_blob(mapping.sha256_digest(b"{}"), 100) == b"{}"
        assert registry.get_blob(mapping.sha256_digest(b"{}"), 100) == b"{}"
    # challenge, token, retry; then the token is reused without a new challenge
    assert [r.url.path for r in seen] == ["/v2/a/b/blobs/" + mapping.sha256_digest(b"{}"),
                                          "/token", "/v2/a/b/blobs/"
                                          + mapping.sha256_digest(b"{}"),
                                          "/v2/a/b/blobs/" + mapping.sha256_digest(b"{}")]


def test_wrong_credentials_are_a_peer_error_naming_the_fix() -> None:
    seen: list[httpx.Request] = []
    with Registry(parse_reference("registry.site/a/b:c"), credentials=Credentials("a", "x"),
                  transport=_token_registry(seen)) as registry, \
            pytest.raises(PeerError, match="--authfile"):
        registry.get_blob(mapping.sha256_digest(b"{}"), 100)


def test_basic_challenge() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") == Credentials("u", "p").basic():
            return httpx.Response(200, content=b"{}")
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    with Registry(parse_reference("registry.site/a/b:c"), credentials=Credentials("u", "p"),
                  transport=httpx.MockTransport(handler)) as registry:
        assert registry.has_blob(mapping.sha256_digest(b"{}"))
