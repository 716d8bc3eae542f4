"""OMS (OpenSSF model signing) interop: the real ``model_signing`` tool verifies an imported
model's directory in the store, and fails once a byte of it changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_helpers import NOW, build, flip_byte, make_sources, write_recipe
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from trust_helpers import trusted_store

from appliance.bundle.oms import (
    OMS_SIGNATURE_NAME,
    carry_signatures,
    statement_paths,
    verify_directory,
)
from appliance.bundle.reader import open_media
from appliance.bundle.recipe import load_recipe
from appliance.bundle.sheet import approval_sheet
from appliance.errors import RecipeError, SignatureError, UsageError
from appliance.importer import import_media
from appliance.store.layout import model_dir

CLI = Path(sys.executable).with_name("model_signing")


def _p256(base: Path, name: str = "oms") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = base / f"{name}.pem"
    public = base / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _oms_verify(directory: Path, public: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "verify", "key", str(directory), "--signature",
         str(directory / OMS_SIGNATURE_NAME), "--public_key", str(public)],
        capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture()
def signed_store(tmp_path: Path) -> tuple[Path, Path]:
    make_sources(tmp_path, random_mib=2)
    private, public = _p256(tmp_path)
    result = build(tmp_path, oms_key=private)
    (model,) = result.manifest.models
    assert [f.path for f in model.files] == ["weights.bin", "notes.txt", OMS_SIGNATURE_NAME]
    store = trusted_store(tmp_path / "store")
    assert import_media(store, [tmp_path / "media"], now=NOW).complete
    return model_dir(store, "acme/tiny", "q4_k_m"), public


def test_model_signing_cli_verifies_the_imported_model_and_fails_on_a_changed_byte(
        signed_store: tuple[Path, Path]) -> None:
    directory, public = signed_store
    ok = _oms_verify(directory, public)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Verification succeeded" in ok.stdout + ok.stderr
    verify_directory(directory, public)  # the library's own verifier agrees
    media = open_media([directory.parents[3] / "media"])
    sheet = approval_sheet(media, media.parse_unverified(), verified=False)
    assert "| 3 (OMS-signed) |" in sheet

    weights = directory / "weights.bin"
    os.chmod(weights, 0o644)
    flip_byte(weights, 12345)
    bad = _oms_verify(directory, public)
    assert bad.returncode != 0
    assert "weights.bin" in bad.stdout + bad.stderr
    with pytest.raises(SignatureError):
        verify_directory(directory, public)


def test_another_publishers_key_does_not_verify(signed_store: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    directory, _ = signed_store
    _, other = _p256(tmp_path, "other")
    assert _oms_verify(directory, other).returncode != 0


def test_carried_signature_must_name_the_models_files(signed_store: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    directory, public = signed_store
    made_elsewhere = tmp_path / "elsewhere.sig"
    shutil.copyfile(directory / OMS_SIGNATURE_NAME, made_elsewhere)
    assert statement_paths(made_elsewhere) == {"weights.bin", "notes.txt"}
    recipe = load_recipe(write_recipe(tmp_path))
    carried = carry_signatures(recipe, {"acme/tiny": made_elsewhere})
    assert [f.dest for f in carried.models[0].files][-1] == OMS_SIGNATURE_NAME
    other = load_recipe(write_recipe(tmp_path, files=("weights.bin",)))
    with pytest.raises(UsageError, match="signs"):
        carry_signatures(other, {"acme/tiny": made_elsewhere})
    with pytest.raises(UsageError, match="not in the recipe"):
        carry_signatures(recipe, {"acme/other": made_elsewhere})
    # Carried through a second bundle, it still verifies the second import.
    build(tmp_path, out="media2", recipe=write_recipe(tmp_path),
          oms_signatures={"acme/tiny": made_elsewhere})
    store = trusted_store(tmp_path / "store2")
    assert import_media(store, [tmp_path / "media2"], now=NOW).complete
    again = model_dir(store, "acme/tiny", "q4_k_m")
    assert (again / OMS_SIGNATURE_NAME).read_bytes() == made_elsewhere.read_bytes()
    assert _oms_verify(again, public).returncode == 0


def test_a_model_file_named_model_sig_is_refused(tmp_path: Path) -> None:
    models = make_sources(tmp_path, random_mib=1)
    (models / OMS_SIGNATURE_NAME).write_bytes(b"not a signature")
    private, _ = _p256(tmp_path)
    with pytest.raises(RecipeError, match=OMS_SIGNATURE_NAME):
        build(tmp_path, recipe=write_recipe(tmp_path, files=("weights.bin", "model.sig")),
              oms_key=private)
