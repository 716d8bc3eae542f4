"""``appliance oci push|pull``: bundles through OCI registries as CNCF ModelPack artifacts."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli import jsonout
from appliance.cli.jsonout import print_json
from appliance.cli.options import override_options
from appliance.cli.store import byte_progress
from appliance.errors import StoreError, UsageError
from appliance.store.layout import human_bytes

if TYPE_CHECKING:
    from appliance.oci.registry import Credentials, Registry
    from appliance.oci.targets import Target

DESCRIPTION = """\
Carry models through the OCI registry a site already runs (Harbor, Distribution, Zot, Quay),
as CNCF ModelPack artifacts: one raw layer per model file, a config filled from the signed
GGUF facts, and the signed manifest, its signatures and the trust chain as an OCI 1.1
referrer of the artifact. A registry only moves bytes: 'oci pull' authenticates the referrer
against THIS host's trust root (rollback, expiry, revocation as for media) before a layer is
read, checks every chunk as it arrives, resumes after a kill, and publishes nothing until the
model is complete. See docs/OCI.md.
"""

PUSH_DESCRIPTION = """\
Push a model of the store (NAME[:VERSION]) or of bundle media (a directory) to a registry
as a ModelPack artifact with its signature referrer, or into an OCI image layout
(--oci-layout DIR) for media or for copies by skopeo or oras.
"""

PULL_DESCRIPTION = """\
Pull a model pushed by 'appliance oci push' (or copied by skopeo/oras together with its
sha256-<digest> referrers tag) into the store: the signature referrer is authenticated
against this host's trust root first, then each chunk is checked as it arrives.
"""

PUSH_EPILOG = """\
examples:
  appliance oci push acme/tiny:q4_k_m registry.site:5000/models/tiny:q4_k_m --ca-file ca.pem
  appliance oci push /media/usb0 registry.site:5000/models/tiny:q4 --model acme/tiny
  appliance oci push acme/tiny --oci-layout /media/usb1/oci --tag q4_k_m
"""

PULL_EPILOG = """\
examples:
  appliance oci pull registry.site:5000/models/tiny:q4_k_m --authfile ~/.docker/config.json
  appliance oci pull q4_k_m --oci-layout /media/usb1/oci
"""


def _registry_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry access")
    group.add_argument("--authfile", type=Path, metavar="FILE",
                       help="Docker-style config.json with credentials (default: "
                            "$REGISTRY_AUTH_FILE, else ~/.docker/config.json)")
    group.add_argument("--username", metavar="NAME", help="registry user (with --password-stdin)")
    group.add_argument("--password-stdin", action="store_true",
                       help="read the registry password from stdin")
    group.add_argument("--ca-file", type=Path, metavar="PEM",
                       help="CA bundle the registry's TLS certificate must chain to")
    group.add_argument("--plain-http", action="store_true",
                       help="speak HTTP without TLS (loopback registries only, for tests)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    oci = sub.add_parser("oci", parents=[common], help="push and pull models through OCI "
                         "registries (CNCF ModelPack)", description=DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = oci.add_subparsers(dest="oci_command", metavar="COMMAND")
    p = commands.add_parser("push", parents=[common], help="push a model as a ModelPack artifact",
                            description=PUSH_DESCRIPTION, epilog=PUSH_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="NAME[:VERSION] in the store, or a media dir")
    p.add_argument("ref", nargs="?", metavar="REF", help="HOST[:PORT]/REPO[:TAG]")
    p.add_argument("--oci-layout", type=Path, metavar="DIR", help="write an OCI image layout")
    p.add_argument("--tag", help="tag in the layout (default: the model version)")
    p.add_argument("--model", metavar="NAME[:VERSION]",
                   help="which model of the media (when it holds several)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _registry_options(p)
    p.set_defaults(func=run_push)
    q = commands.add_parser("pull", parents=[common], help="verify and import a ModelPack artifact",
                            description=PULL_DESCRIPTION, epilog=PULL_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("ref", metavar="REF",
                   help="HOST[:PORT]/REPO[:TAG|@DIGEST], or a tag/digest with --oci-layout")
    q.add_argument("--oci-layout", type=Path, metavar="DIR", help="read an OCI image layout")
    q.add_argument("--allow-expired", action="store_true",
                   help="accept a bundle past its expiry (needs --reason; audited)")
    q.add_argument("--reason", metavar="TEXT", help="why the override is justified")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    _registry_options(q)
    q.set_defaults(func=run_pull)
    oci.set_defaults(func=lambda _args: (oci.print_help(), 1)[1])


def _credentials(args: argparse.Namespace, registry: str) -> Credentials | None:
    from appliance.oci.registry import Credentials, authfile_credentials
    if args.password_stdin:
        if not args.username:
            raise UsageError("--password-stdin goes with --username")
        return Credentials(args.username, sys.stdin.readline().rstrip("\r\n"))
    if args.username:
        raise UsageError("--username needs --password-stdin (passwords are never arguments)")
    return authfile_credentials(registry, args.authfile)


def _registry(args: argparse.Namespace, text: str) -> tuple[Registry, str | None]:
    from appliance.oci.registry import Registry, parse_reference
    ref = parse_reference(text)
    return Registry(ref, credentials=_credentials(args, ref.registry),
                    plain_http=args.plain_http, ca_file=args.ca_file), ref.tag or ref.digest


def run_push(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.oci.layout import OciLayout
    from appliance.oci.push import media_model, push, store_model
    if (args.ref is None) == (args.oci_layout is None):
        raise UsageError("give a registry REF or --oci-layout DIR (one of them)")
    now = datetime.now(UTC)
    source_path = Path(args.source)
    if source_path.is_dir():
        source = media_model([source_path], args.model, now, store_dir=args.store)
    else:
        if args.model:
            raise UsageError("--model picks a model of media; name the store model as SOURCE")
        if not args.store.exists():
            raise StoreError(f"no store at {args.store} and {args.source} is not a directory")
        source = store_model(args.store, args.source)
    target: Target
    if args.oci_layout is not None:
        target, tag = OciLayout(args.oci_layout, create=True), args.tag or source.model.version
    else:
        target, tag = _registry(args, args.ref)
        if args.tag:
            raise UsageError("--tag is for --oci-layout; put the tag in REF")
        tag = tag or source.model.version
    try:
        with byte_progress("pushing", enabled=not args.json) as progress:
            result = push(source, target, tag, progress=progress)
    finally:
        target.close()
    if args.json:
        print_json({"ok": True, **asdict(result), "model": jsonout.model(result.model),
                    "seconds": jsonout.seconds(result.seconds)})
    else:
        Console().print(
            f"pushed {result.model} to {result.target} as {result.tag} "
            f"({result.manifest_digest}); signature referrer {result.signature_digest}"
            + (f" (tag {result.referrers_tag})" if result.referrers_tag else "")
            + f"; {human_bytes(result.uploaded_bytes)} uploaded in {result.seconds:.1f} s",
            highlight=False)
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.oci.layout import OciLayout
    from appliance.oci.pull import pull
    from appliance.store import trust_state
    allow_expired, reason = override_options(args)
    target: Target
    if args.oci_layout is not None:
        target, reference = OciLayout(args.oci_layout), args.ref
    else:
        target, parsed = _registry(args, args.ref)
        reference = parsed or "latest"
    try:
        with byte_progress("pulling", enabled=not args.json) as progress:
            result = pull(args.store, target, reference, now=datetime.now(UTC),
                          allow_expired=allow_expired, reason=reason, progress=progress)
    finally:
        target.close()
    if args.json:
        roots = [signed.root for signed in trust_state.installed_chain(args.store)]
        value = asdict(result)
        value.pop("complete")  # "ok" is the one success flag
        print_json({"ok": result.complete, **value,
                    "model": jsonout.model(result.model),
                    "signers": jsonout.signers(result.signers, roots),
                    "published": [jsonout.model(r) for r in result.published],
                    "present": [jsonout.model(r) for r in result.present],
                    "seconds": jsonout.seconds(result.seconds)})
    else:
        state = "imported" if result.published else "already in the store" if result.present \
            else "incomplete"
        Console().print(
            f"{state} {result.model} from {result.source} (bundle {result.channel} "
            f"#{result.sequence}, signed by {', '.join(result.signers)}); "
            f"{human_bytes(result.fetched_bytes)} fetched, "
            f"{human_bytes(result.already_done_bytes)} already done, {result.seconds:.1f} s",
            highlight=False)
    return 0 if result.complete else 3
