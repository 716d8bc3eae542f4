"""``appliance bundle build|sign|verify|inspect``: make signed bundles and check them."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli import bundle_reports, jsonout
from appliance.cli.jsonout import print_json
from appliance.cli.store import byte_progress
from appliance.errors import MissingVolumeError, UsageError
from appliance.limits import DEFAULT_PACK_BYTES
from appliance.store.layout import human_bytes
from appliance.store.location import require_existing_store

if TYPE_CHECKING:
    from rich.console import Console

    from appliance.bundle.reader import Media
    from appliance.bundle.verify import VerifyReport
    from appliance.format.manifest import Manifest
    from appliance.format.trust import TrustRoot

BUILD_DESCRIPTION = """\
Build a signed bundle from a recipe (see bundles/README.md) onto removable media.

Every file is read once: cut into chunks (GGUF files at tensor boundaries), hashed with
BLAKE3, compressed with zstd when that saves space, and stored once per bundle however many
models share it. The manifest lists every chunk and is signed by each --key. With
--volume-size the bundle is split into MEDIA_DIR/vol-001, vol-002, ... each of which verifies
and imports on its own, in any order. The --trust roots are carried on every volume so sites
can walk from their installed root to the keys that signed. The bundle appears only when it
is complete: an interrupted build leaves no manifest, so nothing half-written can be imported.
SIZE is a byte count or 700M, 4G (powers of 1000, as media are sold), 4GiB (powers of 1024).
"""
BUILD_EPILOG = """\
examples:
  appliance bundle build bundles/default.yaml --key keys/publisher.key \\
      --trust keys/roots/root-1.yaml --out /media/usb0/appliance
  appliance bundle build bundles/site.yaml --key a.key --key b.key --trust root-1.yaml \\
      root-2.yaml --out /srv/out --volume-size 4G --pack-size 1GiB
"""
SIGN_DESCRIPTION = """\
Add a co-signature to a bundle: every volume under MEDIA_DIR gets signatures/<key id>.sig over
the exact manifest bytes. Signing ceremonies with m-of-n publishers run this on each signer's
machine; sites count distinct valid publisher keys against the trust root's threshold.
"""
SIGN_EPILOG = """\
example:
  appliance bundle inspect /media/usb0/appliance        # read what you sign first
  appliance bundle sign /media/usb0/appliance --key /media/token/bob.key
"""
VERIFY_DESCRIPTION = """\
Check a bundle without importing it: walk the carried trust chain from the trusted root,
count valid publisher signatures (before the manifest is even parsed), check scopes and
expiry, the structure of every volume index, and then read, decompress and hash every chunk
of every volume given. Says which volumes are present and which are missing and, on failure,
exactly which chunk, file, volume and pack offset is bad.

The trusted root is --trust ROOT (a root file, e.g. from 'appliance trust init'), else the
root installed in the store. Exit 0 only when every check passed and no volume is missing
(--allow-partial: missing volumes are reported but not an error).
"""
VERIFY_EPILOG = """\
examples:
  appliance bundle verify /media/usb0/appliance --trust keys/roots/root-1.yaml
  appliance bundle verify /media/usb1/vol-002 /media/usb0/vol-001      # the store's root
  appliance bundle verify /media/usb0/vol-001 --allow-partial
"""
INSPECT_DESCRIPTION = """\
Show what a bundle holds before anything is imported: channel, sequence, dates, models with
sizes and GGUF facts, files, signers with their fingerprints (looked up in the trust roots
carried on the media) and the volumes present and missing. Nothing is verified unless --trust
is given: the output says UNVERIFIED until then.
"""
INSPECT_EPILOG = """\
examples:
  appliance bundle inspect /media/usb0/appliance
  appliance bundle inspect /media/usb0/appliance --json --trust keys/roots/root-1.yaml
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bundle = sub.add_parser(
        "bundle", parents=[common], help="build, sign, verify and inspect signed bundles",
        description="Signed model bundles on removable media: build on a connected machine, "
        "co-sign, then verify and inspect at the site.",
        epilog="example:\n  appliance bundle build bundles/default.yaml --key pub.key "
        "--trust root-1.yaml --out /media/usb0/appliance\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = bundle.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help_, description=description,
                                   epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    build = add("build", "build a signed bundle from a recipe", BUILD_DESCRIPTION,
                BUILD_EPILOG)
    build.add_argument("recipe", type=Path, metavar="RECIPE.yaml")
    build.add_argument("--key", action="append", required=True, type=Path, metavar="KEY",
                       help="publisher private key (repeatable); passphrase from "
                       "$APPLIANCE_PASSPHRASE or a prompt")
    build.add_argument("--out", required=True, type=Path, metavar="MEDIA_DIR",
                       help="new or empty directory to write the bundle into")
    build.add_argument("--trust", nargs="+", action="extend", default=[], type=Path,
                       metavar="ROOT", help="trust root files to carry, oldest first")
    build.add_argument("--volume-size", metavar="SIZE",
                       help="split into vol-NNN volumes of at most SIZE bytes each")
    build.add_argument("--pack-size", metavar="SIZE", default=str(DEFAULT_PACK_BYTES),
                       help="largest pack file (default 2GiB; at most 4GiB-1 for FAT32)")
    build.add_argument("--workers", type=int, metavar="N",
                       help="compression threads (default: one per CPU)")
    build.add_argument("--parity", type=int, default=0, metavar="K",
                       help="add K parity volumes par-NNN: any K lost or damaged volumes are "
                       "rebuilt on import and verify (needs --volume-size)")
    build.add_argument("--oms-key", type=Path, metavar="KEY.pem",
                       help="also sign each model with OpenSSF model signing (P-256 key) and "
                       "carry the signature as the model's model.sig file")
    build.add_argument("--oms-signature", action="append", default=[], metavar="NAME=FILE",
                       help="carry an OMS signature made elsewhere as model NAME's model.sig")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(func=run_build)

    sign = add("sign", "add a co-signature to a bundle", SIGN_DESCRIPTION, SIGN_EPILOG)
    sign.add_argument("media", type=Path, metavar="MEDIA_DIR")
    sign.add_argument("--key", required=True, type=Path, metavar="KEY",
                      help="publisher private key that signs now")
    sign.set_defaults(func=run_sign)

    verify = add("verify", "verify signatures and every byte of a bundle", VERIFY_DESCRIPTION,
                 VERIFY_EPILOG)
    verify.add_argument("media", nargs="+", type=Path, metavar="MEDIA_DIR",
                        help="a volume, or a media directory holding vol-NNN volumes")
    verify.add_argument("--trust", type=Path, metavar="ROOT",
                        help="trusted root file (default: the root installed in the store)")
    verify.add_argument("--allow-expired", action="store_true",
                        help="report an expired bundle or root instead of refusing it")
    verify.add_argument("--allow-partial", action="store_true",
                        help="exit 0 when the volumes given are good but others are missing")
    verify.add_argument("--workers", type=int, default=2, metavar="N",
                        help="hashing threads (default 2)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=run_verify)

    inspect = add("inspect", "show what a bundle holds", INSPECT_DESCRIPTION, INSPECT_EPILOG)
    inspect.add_argument("media", nargs="+", type=Path, metavar="MEDIA_DIR")
    inspect.add_argument("--trust", type=Path, metavar="ROOT",
                         help="verify signatures against this root file first")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--sbom", action="store_true",
                         help="print a CycloneDX 1.6 ML-BOM instead (as 'bundle sbom')")
    inspect.set_defaults(func=run_inspect)
    bundle_reports.register(add)


def _now() -> datetime:
    return datetime.now(UTC)


def _trusted_root(path: Path | None, store: Path, now: datetime, allow_expired: bool
                  ) -> TrustRoot:
    from appliance.format.trust import verify_self_signed
    from appliance.store import trust_state
    if path is None:
        require_existing_store(store)
        return trust_state.require_root(store)
    return verify_self_signed(trust_state.read_root_file(path), now,
                              allow_expired=allow_expired)


def _console() -> Console:
    from rich.console import Console
    return Console(highlight=False, soft_wrap=True, markup=False)


def run_build(args: argparse.Namespace) -> int:
    from appliance.bundle.builder import build_bundle
    from appliance.bundle.recipe import parse_size
    from appliance.format.manifest import format_timestamp
    from appliance.store import trust_state
    volume_size = parse_size(args.volume_size) if args.volume_size else None
    pack_size = parse_size(args.pack_size)
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    from appliance.keyfiles import load_signing_keys
    keys = load_signing_keys(list(args.key))
    with byte_progress("building", enabled=sys.stderr.isatty()) as progress:
        result = build_bundle(args.recipe, keys, args.out, trust_chain=args.trust,
                              volume_size=volume_size, pack_size=pack_size, progress=progress,
                              workers=args.workers, parity=args.parity,
                              oms_key=args.oms_key,
                              oms_signatures=bundle_reports.oms_signatures(args.oms_signature),
                              notify=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        carried = [trust_state.read_root_file(p).root for p in args.trust]
        print_json({
            "ok": True, "out": str(result.out_dir), "volumes": [str(v) for v in result.volumes],
            "manifest_hash": result.manifest_hash,
            "models": [{"name": m.name, "version": m.version} for m in result.manifest.models],
            "signers": jsonout.signers(result.signers, carried),
            "total_bytes": result.total_bytes, "stored_bytes": result.stored_bytes,
            "chunks": result.chunk_count, "unique_chunks": result.unique_chunk_count,
            "seconds": jsonout.seconds(result.seconds),
        })
        return 0
    console = _console()
    m = result.manifest
    console.print(f"built bundle {m.channel} #{m.sequence} in {result.out_dir}")
    console.print(f"  manifest {result.manifest_hash}")
    for model in m.models:
        console.print(f"  {model.name} {model.version}: {len(model.files)} file(s), "
                      f"{human_bytes(model.size)}")
    rate = result.total_bytes / result.seconds / 1e6 if result.seconds else 0.0
    console.print(
        f"  {human_bytes(result.total_bytes)} in {result.unique_chunk_count} distinct chunks "
        f"({result.chunk_count} in all), {human_bytes(result.stored_bytes)} on media, "
        f"{len(result.volumes)} volume(s), {result.seconds:.1f} s ({rate:.0f} MB/s)"
    )
    console.print(f"  signed by {', '.join(result.signers)}; expires "
                  f"{format_timestamp(m.expires)}")
    if result.parity_volumes:
        console.print(f"  parity volumes: {', '.join(p.name for p in result.parity_volumes)}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from appliance.bundle.signers import add_signature
    from appliance.keyfiles import load_signing_keys
    (key,) = load_signing_keys([args.key])
    signature = add_signature(args.media, key)
    _console().print(f"signed {args.media} with key {signature.key_id}")
    return 0


def _report_json(report: VerifyReport) -> dict[str, Any]:
    b = report.bundle
    return {
        "ok": report.complete, "manifest_hash": b.manifest_hash,
        "channel": b.manifest.channel, "sequence": b.manifest.sequence,
        "root_version": b.root.version, "signers": jsonout.signers(b.signers, [b.root]),
        "models": [{"name": m.name, "version": m.version} for m in b.manifest.models],
        "expired_override": b.expired_override,
        "volumes_present": list(report.volumes_present),
        "volumes_missing": list(report.volumes_missing),
        "chunks_verified": report.chunks_verified, "bytes_verified": report.plain_bytes,
        "rebuilt": list(report.rebuilt),
        "seconds": jsonout.seconds(report.seconds),
    }


def run_verify(args: argparse.Namespace) -> int:
    from appliance.bundle.parity_rebuild import verify_media_with_parity
    from appliance.format.manifest import format_timestamp
    now = _now()
    root = _trusted_root(args.trust, args.store, now, args.allow_expired)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    with byte_progress("verifying", enabled=sys.stderr.isatty()) as progress:
        report = verify_media_with_parity(args.media, root, now, progress=progress,
                                          workers=args.workers,
                                          allow_expired=args.allow_expired)
    if args.json:
        print_json(_report_json(report))
    else:
        console = _console()
        b = report.bundle
        console.print(f"bundle {b.manifest.channel} #{b.manifest.sequence} "
                      f"({b.manifest_hash[:16]}...): signatures OK, trust root v{b.root.version}")
        console.print(f"  signed by {', '.join(b.root.key_label(k) for k in sorted(b.signers))}")
        if b.expired_override:
            console.print(f"  EXPIRED at {format_timestamp(b.manifest.expires)} "
                          "(accepted: --allow-expired)")
        rate = report.stored_bytes / report.seconds / 1e6 if report.seconds else 0.0
        console.print(f"  {report.chunks_verified} chunks, {human_bytes(report.plain_bytes)} "
                      f"verified in {report.seconds:.1f} s ({rate:.0f} MB/s read)")
        console.print(f"  volumes present: {', '.join(report.volumes_present)}")
        if report.volumes_missing:
            console.print(f"  volumes missing: {', '.join(report.volumes_missing)}")
        if report.rebuilt:
            console.print(f"  rebuilt from parity: {', '.join(report.rebuilt)}")
    if report.volumes_missing and not args.allow_partial:
        raise MissingVolumeError(
            f"volumes {', '.join(report.volumes_missing)} were not given; the volumes given "
            "verified (pass --allow-partial to accept that)"
        )
    return 0


def _signer_rows(media: Media) -> list[dict[str, Any]]:
    """Each signature's key, named by the newest carried root that lists it (unverified)."""
    roots = [s.root for s in media.chain]
    return [jsonout.key(sig.key_id, roots) for sig in media.signatures]


def _inspect_json(media: Media, manifest: Manifest, verified: bool) -> dict[str, Any]:
    from appliance.format.manifest import manifest_to_value
    value = manifest_to_value(manifest)
    for model, entry in zip(value["models"], manifest.models, strict=True):
        model["size"] = entry.size
        for file in model["files"]:
            file["chunks"] = len(file["chunks"])
    return {
        "ok": True, "verified": verified, "manifest_hash": media.manifest_hash, **value,
        "signers": _signer_rows(media), "carried_roots": [s.root.version for s in media.chain],
        "volumes_present": media.volumes_present, "volumes_missing": media.volumes_missing,
    }


def run_inspect(args: argparse.Namespace) -> int:
    from appliance.bundle.reader import open_media
    from appliance.format.manifest import format_timestamp
    media = open_media(args.media)
    verified = args.trust is not None
    if verified:
        now = _now()
        manifest = media.authenticate(_trusted_root(args.trust, args.store, now, False),
                                      now).manifest
    else:
        manifest = media.parse_unverified()
    if args.sbom:
        return bundle_reports.print_sbom(media, manifest, verified)
    if args.json:
        print_json(_inspect_json(media, manifest, verified))
        return 0
    console = _console()
    state = "verified" if verified else "UNVERIFIED (run 'appliance bundle verify')"
    console.print(f"bundle {manifest.channel} #{manifest.sequence}: {state}")
    console.print(f"  manifest {media.manifest_hash}")
    console.print(f"  created {format_timestamp(manifest.created)}, expires "
                  f"{format_timestamp(manifest.expires)}")
    for model in manifest.models:
        console.print(f"  model {model.name} {model.version} ({model.license}), "
                      f"{human_bytes(model.size)}")
        if model.gguf:
            g = model.gguf
            params = f"{g.parameter_count:,}" if g.parameter_count is not None else "?"
            console.print(f"    gguf: {g.architecture}, {g.quantization or '?'}, {params} "
                          f"parameters, context {g.context_length or '?'}, {g.tensor_count} "
                          "tensors" + (", chat template" if g.chat_template_hash else ""))
        for file, source in zip(model.files, model.provenance.sources, strict=True):
            console.print(f"    {file.path}: {human_bytes(file.size)}, {len(file.chunks)} "
                          f"chunks, from {source.source} (sha256 {source.sha256[:16]}...)")
    for row in _signer_rows(media):
        who = (f"{row['name']} [{row['words']}]" if row["name"]
               else "a key in no carried trust root")
        console.print(f"  signature by {row['key_id']}: {who}")
    carried = ", ".join(f"v{s.root.version}" for s in media.chain) or "none"
    console.print(f"  trust roots carried: {carried}")
    console.print(f"  volumes present: {', '.join(media.volumes_present)}"
                  + (f"; missing: {', '.join(media.volumes_missing)}"
                     if media.volumes_missing else ""))
    return 0
