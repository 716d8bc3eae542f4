"""OpenSSF Model Signing (OMS v1.0) signatures carried in a bundle, for other tools to verify.

A site whose security team uses the OpenSSF ``model_signing`` tool can check what appliance
imported with that tool alone. ``bundle build --oms-key KEY.pem`` signs each model of the
recipe with the ``model_signing`` library itself (its elliptic-key method: a Sigstore bundle
holding a DSSE envelope over an in-toto statement of every file's SHA-256, signed with the
publisher's P-256 key), before the bundle is built, and adds the signature to the model as
one more file, ``model.sig`` (OMS's default name). Being a file of the model, it is listed in
the signed manifest, chunked, checked on import like every other byte, and lands in the
store next to the model's files, so after import::

    model_signing verify key STORE/models/acme~tiny/q4_k_m \\
        --signature STORE/models/acme~tiny/q4_k_m/model.sig --public_key publisher.pub

verifies the directory (the tool leaves the signature file itself out of the hash) and fails
on any changed byte. ``--oms-signature FILE`` instead carries a signature made elsewhere
(single-model recipes), as signed provenance of the publisher's own.

The model directory is signed as the store will lay it out: a temporary directory of symlinks,
one per file at its bundle path, pointing at the recipe's sources (no copy of a large model;
``allow_symlinks`` only lets the signer follow them, the statement records plain paths and
digests). ``model_signing`` errors are translated here (``UsageError`` for key problems,
``SignatureError`` when a verification fails).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from appliance.bundle.recipe import FileSpec, ModelSpec, Recipe
from appliance.bundle.sources import resolve_source
from appliance.errors import RecipeError, SignatureError, UsageError
from appliance.paths import PASSPHRASE_ENV

OMS_SIGNATURE_NAME = "model.sig"
# What OMS itself ignores in a model directory by default (git files), plus the signature.
_GIT_PATHS = True


def _model_dests(model: ModelSpec) -> list[tuple[str, Path]]:
    out = []
    for spec in model.files:
        source = resolve_source(spec)
        if source.dest == OMS_SIGNATURE_NAME:
            raise RecipeError(f"model {model.name} already has a file named "
                              f"{OMS_SIGNATURE_NAME}, the name its OMS signature takes")
        out.append((source.dest, source.local_path))
    return out


def sign_directory(model_dir: Path, signature: Path, private_key: Path) -> None:
    """Sign ``model_dir`` with the ``model_signing`` library (elliptic key, file hashes)."""
    import model_signing  # heavy (sigstore); only builds that sign pay for it

    password = os.environ.get(PASSPHRASE_ENV)
    if b"ENCRYPTED" not in _read_key(private_key):
        password = None
    hashing = model_signing.hashing.Config().set_ignored_paths(
        paths=[OMS_SIGNATURE_NAME], ignore_git_paths=_GIT_PATHS).set_allow_symlinks(True)
    try:
        model_signing.signing.Config().use_elliptic_key_signer(
            private_key=private_key, password=password).set_hashing_config(hashing).sign(
            model_dir, signature)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--oms-key {private_key}: cannot sign with it ({e})") from e


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"--oms-key {path}: {e}") from e


def sign_recipe(recipe: Recipe, private_key: Path
                ) -> tuple[Recipe, tempfile.TemporaryDirectory[str]]:
    """``recipe`` with a ``model.sig`` file added to every model, signed by ``private_key``.

    The signatures are in the returned temporary directory: keep it until the build has read
    them (it is removed when the object goes)."""
    work = tempfile.TemporaryDirectory(prefix="appliance-oms-")
    models = []
    for number, model in enumerate(recipe.models):
        base = Path(work.name) / str(number)
        layout = base / model.version  # the store's directory is named by the version too
        for dest, local in _model_dests(model):
            link = layout.joinpath(*dest.split("/"))
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(local.resolve())
        signature = base / OMS_SIGNATURE_NAME
        sign_directory(layout, signature, private_key)
        models.append(_with_signature(model, signature, f"oms-key:{private_key.name}"))
    return dataclasses.replace(recipe, models=tuple(models)), work


def carry_signatures(recipe: Recipe, signatures: Mapping[str, Path]) -> Recipe:
    """``recipe`` with OMS signatures made elsewhere added (model name -> signature file).

    Each must be a Sigstore bundle whose statement names exactly the model's files; its
    cryptography is for the site's ``model_signing verify`` to check."""
    names = {m.name for m in recipe.models}
    unknown = set(signatures) - names
    if unknown:
        raise UsageError(f"--oms-signature for a model not in the recipe: {sorted(unknown)}")
    models = []
    for model in recipe.models:
        path = signatures.get(model.name)
        if path is not None:
            dests = {dest for dest, _ in _model_dests(model)}
            signed = statement_paths(path)
            if signed != dests:
                raise UsageError(
                    f"--oms-signature {path} signs {sorted(signed)}, but model {model.name} "
                    f"has {sorted(dests)}")
            model = _with_signature(model, path, f"oms-signature:{path.name}")
        models.append(model)
    return dataclasses.replace(recipe, models=tuple(models))


def _with_signature(model: ModelSpec, signature: Path, written: str) -> ModelSpec:
    spec = FileSpec(kind="path", location=str(signature), dest=OMS_SIGNATURE_NAME,
                    written=written)
    return dataclasses.replace(model, files=(*model.files, spec))


def statement_paths(signature: Path) -> set[str]:
    """The file paths an OMS signature's in-toto statement lists (no cryptography checked)."""
    import base64

    try:
        bundle = json.loads(signature.read_bytes())
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        return {r["name"] for r in payload["predicate"]["resources"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{signature} is not an OMS signature (Sigstore bundle): {e}") from e


def verify_directory(model_dir: Path, public_key: Path,
                     signature: Path | None = None) -> None:
    """Verify ``model_dir`` against its OMS signature (default ``model_dir/model.sig``) with
    the ``model_signing`` library; ``SignatureError`` when it does not verify."""
    import model_signing

    signature = signature or model_dir / OMS_SIGNATURE_NAME
    hashing = model_signing.hashing.Config().set_ignored_paths(
        paths=[OMS_SIGNATURE_NAME], ignore_git_paths=_GIT_PATHS)
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(
            public_key=public_key).set_hashing_config(hashing).verify(model_dir, signature)
    except ValueError as e:
        raise SignatureError(f"OMS signature {signature} does not verify {model_dir}: {e}"
                             ) from e
