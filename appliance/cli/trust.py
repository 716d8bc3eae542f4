"""``appliance trust init|rotate|sign|install|fingerprint|show``: make, rotate and install roots."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import fsutil
from appliance.cli.jsonout import print_json
from appliance.cli.options import override_options
from appliance.errors import FormatError, UsageError
from appliance.limits import DEFAULT_LIMITS
from appliance.store.location import require_existing_store

if TYPE_CHECKING:
    from appliance.format.trust import SignedRoot, TrustKey, TrustRoot
    from appliance.store import trust_summary

DEFAULT_EXPIRES_DAYS = 365

SCOPE_HELP = (
    "PUB is a .pub file; ':PATTERN,...' limits the key to model names matching a pattern "
    "('*' any run of characters including '/', '?' one character), e.g. keys/acme.pub:acme/* ; "
    "without patterns the key may sign any model"
)

INIT_DESCRIPTION = """\
Write version 1 of a trust root: the root keys (which sign trust roots) with their threshold,
the publisher keys (which sign bundles) with theirs, and an expiry. Every --sign-with key signs
the exact body. Without --partial, the file is written only when a threshold of the root keys
signed it; with --partial it is written anyway so other machines can co-sign it with
'appliance trust sign'. Print the fingerprint on paper for the sites (see keys/README.md).
"""
INIT_EPILOG = """\
examples:
  appliance trust init --root-key keys/alice-root.pub keys/bob-root.pub keys/carol-root.pub \\
      --root-threshold 2 --publisher-key 'keys/acme.pub:acme/*' keys/ops.pub \\
      --publisher-threshold 1 --sign-with /media/alice/alice-root.key \\
      /media/bob/bob-root.key --out root-1.yaml --expires 365
"""
ROTATE_DESCRIPTION = """\
Write version N+1 of a trust root from version N: add or remove keys per role, change
thresholds, renew the expiry. Sites accept it only when a threshold of version N's root keys
AND a threshold of its own root keys signed it, so sign with enough of both (one key in both
counts for both). Removing a publisher key revokes it: bundles it signs are refused by every
host that has walked to the new version. Keep every version: bundles carry the whole chain.
"""
ROTATE_EPILOG = """\
examples:
  appliance trust rotate root-1.yaml --out root-2.yaml \\
      --add-key root=keys/dave-root.pub --remove-key root=keys/bob-root.pub \\
      --add-key 'publisher=keys/beta.pub:beta/*,shared/*' --threshold publisher=1 \\
      --sign-with alice-root.key carol-root.key dave-root.key
  appliance trust rotate root-2.yaml --out root-3.yaml --sign-with a.key c.key   # renew
"""
SIGN_DESCRIPTION = """\
Add signatures to a trust root file in place (an m-of-n ceremony signs on several machines).
With --previous, also report whether version N's root-key threshold is met.
"""
SIGN_EPILOG = """\
example:
  appliance trust sign root-2.yaml --sign-with /media/carol/carol-root.key --previous root-1.yaml
"""
INSTALL_DESCRIPTION = """\
Install trust roots into this host's store. On a fresh store, the root whose fingerprint equals
--fingerprint (read from the paper the signing ceremony produced, not from the file) becomes
the first trusted root, and any newer ROOT files given are then walked as a rotation chain.
On a store that already trusts a root, the files are walked from it: each newer version must
be signed by a threshold of the previous version's root keys and of its own.
An expired root is refused unless --allow-expired --reason TEXT, recorded in the audit log.
"""
INSTALL_EPILOG = """\
examples:
  appliance trust install /media/usb/root-1.yaml --fingerprint 3f2a-9b1c-0d4e-77a0-...
  appliance trust install root-1.yaml root-2.yaml root-3.yaml
"""
SHOW_DESCRIPTION = """\
Show the trust root in force in this store (or in a ROOT file, unverified): version,
fingerprint, created and expiry dates, keys with their roles and model patterns, thresholds,
every installed version, and the highest sequence accepted per channel.
"""


def _formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    trust = sub.add_parser(
        "trust",
        parents=[common],
        help="make, rotate, install and show trust roots",
        description="Trust roots say which keys may sign roots and bundles, and how many must.",
        epilog="example:\n  appliance trust install root-1.yaml --fingerprint 3f2a-9b1c-...\n",
        formatter_class=_formatter(),
    )
    ts = trust.add_subparsers(dest="trust_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return ts.add_parser(
            name, parents=[common], help=help_, description=description, epilog=epilog,
            formatter_class=_formatter(),
        )

    init = add("init", "write version 1 of a trust root", INIT_DESCRIPTION, INIT_EPILOG)
    init.add_argument("--root-key", nargs="+", action="extend", required=True, type=Path,
                      metavar="PUB", help="public key file of a root key (repeatable)")
    init.add_argument("--root-threshold", type=int, required=True, metavar="N",
                      help="how many root keys must sign a trust root")
    init.add_argument("--publisher-key", nargs="+", action="extend", required=True,
                      metavar="PUB[:PATTERN,...]", help=SCOPE_HELP)
    init.add_argument("--publisher-threshold", type=int, required=True, metavar="M",
                      help="how many publisher keys must sign a bundle (per model, in scope)")
    _signing_options(init)
    init.set_defaults(func=run_init)

    rotate = add("rotate", "write version N+1, signed by old and new root keys",
                 ROTATE_DESCRIPTION, ROTATE_EPILOG)
    rotate.add_argument("old_root", type=Path, metavar="OLD_ROOT", help="version N file")
    rotate.add_argument("--add-key", action="append", default=[], metavar="ROLE=PUB[:PATTERN,...]",
                        help="add a key to role 'root' or 'publisher' (patterns: publisher "
                        "only; " + SCOPE_HELP + ")")
    rotate.add_argument("--remove-key", action="append", default=[], metavar="ROLE=PUB|KEYID",
                        help="remove a key (given by .pub file or key id) from a role")
    rotate.add_argument("--threshold", action="append", default=[], metavar="ROLE=N",
                        help="set a role's threshold (default: unchanged)")
    _signing_options(rotate)
    rotate.set_defaults(func=run_rotate)

    sign = add("sign", "co-sign a trust root file in place", SIGN_DESCRIPTION, SIGN_EPILOG)
    sign.add_argument("root", type=Path, metavar="ROOT")
    sign.add_argument("--sign-with", nargs="+", action="extend", required=True, type=Path,
                      metavar="KEY", help="private key file(s); passphrase from "
                      "$APPLIANCE_PASSPHRASE or a prompt")
    sign.add_argument("--previous", type=Path, metavar="OLD_ROOT",
                      help="version N, to report its threshold too")
    sign.set_defaults(func=run_sign)

    install = add("install", "install the first root (by fingerprint) or newer versions",
                  INSTALL_DESCRIPTION, INSTALL_EPILOG)
    install.add_argument("roots", nargs="+", type=Path, metavar="ROOT")
    install.add_argument("--fingerprint", metavar="FP",
                         help="fingerprint read from paper (needed on a fresh store)")
    install.add_argument("--allow-expired", action="store_true",
                         help="accept an expired root (audited; needs --reason)")
    install.add_argument("--reason", metavar="TEXT", help="why the override is needed")
    install.set_defaults(func=run_install)

    fp = add("fingerprint", "print a root file's fingerprint alone on one line",
             "Print the fingerprint of ROOT's signed body (for paper and scripts). It implies "
             "no trust: compare it with the one from the signing ceremony.",
             "example:\n  appliance trust fingerprint root-1.yaml\n")
    fp.add_argument("root", type=Path, metavar="ROOT")
    fp.set_defaults(func=run_fingerprint)

    show = add("show", "show the installed trust root (or a file's)", SHOW_DESCRIPTION,
               "examples:\n  appliance trust show\n  appliance trust show root-2.yaml --json\n")
    show.add_argument("root", nargs="?", type=Path, metavar="ROOT",
                      help="show this file instead of the store's root")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)


def _signing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sign-with", nargs="+", action="extend", required=True, type=Path,
                        metavar="KEY", help="private key file(s) that sign now; passphrase "
                        "from $APPLIANCE_PASSPHRASE or a prompt")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="trust root file to write (never overwritten without --force)")
    parser.add_argument("--expires", type=int, default=DEFAULT_EXPIRES_DAYS, metavar="DAYS",
                        help=f"days until the root expires (default {DEFAULT_EXPIRES_DAYS})")
    parser.add_argument("--partial", action="store_true",
                        help="write even if fewer root keys signed than needed (co-sign later)")
    parser.add_argument("--force", action="store_true", help="overwrite --out")


# --- helpers -----------------------------------------------------------------------------


def _read_root(path: Path) -> SignedRoot:
    from appliance.store import trust_state
    return trust_state.read_root_file(path)


def _write_atomic(path: Path, data: bytes, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --force to overwrite it")
    try:
        fsutil.write_atomic(path, data, mode=0o644)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e}") from e


def trust_key(path: Path) -> TrustKey:
    from appliance.format.signing import key_id
    from appliance.format.trust import TrustKey
    from appliance.keyfiles import PUBLIC_SUFFIX, load_public_key, valid_key_name
    public = load_public_key(path)
    kid = key_id(public)
    name = path.name[: -len(PUBLIC_SUFFIX)] if path.name.endswith(PUBLIC_SUFFIX) else path.stem
    return TrustKey(kid, public, name if valid_key_name(name) else f"key-{kid[:8]}")


def parse_scoped_key(spec: str) -> tuple[Path, tuple[str, ...]]:
    """``PUB[:PATTERN,...]`` -> (path, patterns); a path that exists as given wins."""
    from appliance.format.trust import valid_pattern
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), ()
    file_part, _, pattern_text = spec.rpartition(":")
    patterns = tuple(p for p in pattern_text.split(",") if p)
    if not patterns:
        raise UsageError(f"{spec!r}: no model pattern after ':'")
    for pattern in patterns:
        if not valid_pattern(pattern, DEFAULT_LIMITS):
            raise UsageError(f"{spec!r}: bad model pattern {pattern!r} (use A-Z a-z 0-9 ._/@+-*?)")
    if len(set(patterns)) != len(patterns):
        raise UsageError(f"{spec!r}: a pattern is repeated")
    return Path(file_part), patterns


def _role_value(spec: str, option: str) -> tuple[str, str]:
    from appliance.format.trust import ROLES
    role, sep, value = spec.partition("=")
    if not sep or role not in ROLES or not value:
        raise UsageError(f"{option} {spec!r}: use ROLE=VALUE with ROLE one of {', '.join(ROLES)}")
    return role, value


def _key_ref(value: str) -> str:
    """A key id given directly, or the id of a .pub file."""
    from appliance.format.signing import key_id
    from appliance.keyfiles import load_public_key
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return value
    return key_id(load_public_key(Path(value)))


def _status_lines(signed: SignedRoot, previous: TrustRoot | None) -> tuple[list[str], bool]:
    from appliance.format.signing import DOMAIN_ROOT
    from appliance.format.trust import ROLE_ROOT, valid_signers
    lines, complete = [], True
    authorities = [("its own", signed.root)] + ([(f"v{previous.version}'s", previous)]
                                                 if previous else [])
    for label, authority in authorities:
        valid = valid_signers(authority, ROLE_ROOT, DOMAIN_ROOT, signed.body, signed.signatures)
        need = authority.root_role.threshold
        complete = complete and len(valid) >= need
        mark = "ok" if len(valid) >= need else f"NEEDS {need - len(valid)} MORE"
        lines.append(f"{len(valid)} of {need} signatures from {label} root keys ({mark})")
    return lines, complete


def _finish(args: argparse.Namespace, body: bytes, previous: TrustRoot | None) -> int:
    from appliance.format.trust import encode_envelope, parse_signed_root
    from appliance.format.trust_build import sign_root_body
    from appliance.keyfiles import load_signing_keys
    signatures = sign_root_body(body, load_signing_keys(args.sign_with))
    signed = parse_signed_root(encode_envelope(body, signatures))
    lines, complete = _status_lines(signed, previous)
    if not complete and not args.partial:
        raise UsageError(
            "not enough root keys signed; nothing written. " + " / ".join(lines)
            + ". Sign with more keys, or pass --partial and co-sign with 'appliance trust sign'"
        )
    _write_atomic(args.out, signed.to_bytes(), overwrite=args.force)
    _print_summary(args.out, signed, lines)
    return 0


def _print_summary(path: Path, signed: SignedRoot, lines: list[str]) -> None:
    from appliance.format.fields import format_timestamp
    from appliance.format.signing import fingerprint_words
    root = signed.root
    print(f"wrote:       {path}")
    print(f"version:     {root.version}")
    print(f"expires:     {format_timestamp(root.expires)}")
    print(f"fingerprint: {root.fingerprint}")
    print(f"words:       {fingerprint_words(signed.body)}")
    for line in lines:
        print(f"signatures:  {line}")


def _validity(days: int) -> tuple[datetime, datetime]:
    if days < 1:
        raise UsageError(f"--expires must be at least 1 day, got {days}")
    now = datetime.now(UTC).replace(microsecond=0)
    return now, now + timedelta(days=days)


# --- handlers ----------------------------------------------------------------------------


def run_init(args: argparse.Namespace) -> int:
    from appliance.format.trust import ANY_MODEL
    from appliance.format.trust_build import new_root_body
    created, expires = _validity(args.expires)
    keys = [trust_key(p) for p in args.root_key]
    publishers: dict[str, tuple[str, ...]] = {}
    for spec in args.publisher_key:
        path, patterns = parse_scoped_key(spec)
        key = trust_key(path)
        keys.append(key)
        publishers[key.key_id] = patterns or (ANY_MODEL,)
    try:
        body = new_root_body(
            version=1, created=created, expires=expires, keys=keys,
            root_keys=[k.key_id for k in keys[: len(args.root_key)]],
            root_threshold=args.root_threshold, publisher_models=publishers,
            publisher_threshold=args.publisher_threshold,
        )
    except FormatError as e:
        raise UsageError(str(e)) from e
    return _finish(args, body, None)


def run_rotate(args: argparse.Namespace) -> int:
    from appliance.format.trust import ROLE_PUBLISHER
    from appliance.format.trust_build import rotated_body
    old = _read_root(args.old_root)
    created, expires = _validity(args.expires)
    add, remove, thresholds = [], [], {}
    for spec in args.add_key:
        role, value = _role_value(spec, "--add-key")
        path, patterns = parse_scoped_key(value)
        if patterns and role != ROLE_PUBLISHER:
            raise UsageError(f"--add-key {spec!r}: model patterns apply to publisher keys only")
        add.append((role, trust_key(path), patterns))
    for spec in args.remove_key:
        role, value = _role_value(spec, "--remove-key")
        remove.append((role, _key_ref(value)))
    for spec in args.threshold:
        role, value = _role_value(spec, "--threshold")
        if not value.isdigit():
            raise UsageError(f"--threshold {spec!r}: N must be a positive integer")
        thresholds[role] = int(value)
    try:
        body = rotated_body(old.root, created=created, expires=expires, add=add,
                            remove=remove, thresholds=thresholds)
    except FormatError as e:
        raise UsageError(str(e)) from e
    return _finish(args, body, old.root)


def run_sign(args: argparse.Namespace) -> int:
    from appliance.format.trust_build import sign_root_body
    from appliance.keyfiles import load_signing_keys
    signed = _read_root(args.root)
    previous = _read_root(args.previous).root if args.previous else None
    if previous is not None and previous.version + 1 != signed.root.version:
        raise UsageError(f"--previous is v{previous.version}, not v{signed.root.version - 1}")
    signed = signed.with_signatures(sign_root_body(signed.body, load_signing_keys(args.sign_with)))
    _write_atomic(args.root, signed.to_bytes(), overwrite=True)
    lines, _ = _status_lines(signed, previous)
    _print_summary(args.root, signed, lines)
    return 0


def run_install(args: argparse.Namespace) -> int:
    from appliance.store import trust_state
    allow_expired, reason = override_options(args)
    result = trust_state.install_roots(
        args.store, [_read_root(p) for p in args.roots], args.fingerprint, datetime.now(UTC),
        allow_expired=allow_expired, reason=reason,
    )
    if result.first is not None:
        print(f"installed trust root v{result.first.version} ({result.first.fingerprint})")
    root, start = result.root, result.start
    if start is None:
        return 0
    if root.version != start.version:
        print(f"trust root updated v{start.version} -> v{root.version} ({root.fingerprint})")
    else:
        print(f"trust root stays at v{root.version} ({root.fingerprint}): nothing newer")
    return 0


def run_fingerprint(args: argparse.Namespace) -> int:
    print(_read_root(args.root).root.fingerprint)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from appliance.store import trust_state, trust_summary
    now = datetime.now(UTC)
    if args.root is not None:
        signed = _read_root(args.root)
        summary = trust_summary.describe(signed.root, signed.body, now)
        source = str(args.root)
        signatures = _status_lines(signed, None)[0]
    else:
        require_existing_store(args.store)
        found = trust_summary.store_summary(args.store, now)
        if found is None:
            trust_state.require_root(args.store)
        assert found is not None
        summary, source, signatures = found, f"store {args.store}", []
    if args.json:
        report = {"ok": True, "source": source, **summary.to_json()}
        if args.root is not None:
            report["signatures"] = signatures
        print_json(report)
        return 0
    _print_report(summary, source, signatures, now)
    return 0


def _print_report(summary: trust_summary.TrustSummary, source: str, signatures: list[str],
                  now: datetime) -> None:
    from appliance.format.fields import format_timestamp
    print(f"trust root v{summary.version} from {source}")
    print(f"  fingerprint  {summary.fingerprint}")
    print(f"  words        {summary.words}")
    print(f"  created      {summary.created}")
    expired = " (EXPIRED: this host's clock says " + format_timestamp(now) + ")"
    print(f"  expires      {summary.expires}{expired if summary.expired else ''}")
    for name, threshold, count in summary.thresholds:
        print(f"  role {name}: {threshold} of {count} keys must sign")
    for key in summary.keys:
        models = f"  models {', '.join(key.models)}" if key.models else ""
        print(f"  key {key.key_id}  {key.name:<20} {'+'.join(key.roles)}{models}")
    for line in signatures:
        print(f"  {line}")
    for entry in summary.installed:
        print(f"  installed v{entry.version}  {entry.fingerprint}  {entry.installed_at}")
    for mark in summary.channels:
        print(f"  channel {mark.channel}: sequence {mark.sequence} "
              f"(manifest {mark.manifest[:16]}..., {mark.updated_at})")
