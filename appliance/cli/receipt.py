"""``appliance receipt verify|replay``, and the ``--receipts`` options of ``appliance serve``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import EXIT_OK, EXIT_REFUSED, UsageError

if TYPE_CHECKING:
    from cryptography import x509

    from appliance.serve.receipts import ReceiptOptions

VERIFY_DESCRIPTION = """\
Check a receipt that 'appliance serve --receipts' attached to an answer:

  1. its signature, under the host certificate it carries (any changed field fails);
  2. that certificate: issued by this site's CA (--ca, else ca.crt of this host's TLS
     directory), naming the host, valid at the receipt's time;
  3. the model: the signed bundle it names is in this store, still signed under this store's
     trust root, and lists the model, version and file with the receipt's Merkle root;
  4. with --request / --response: the exact request body sent, and the answer received
     (saved as received: the JSON body, or the raw stream of a streamed answer).

RECEIPT is a file holding the receipt's JSON, the X-Appliance-Receipt header value, or a saved
response that carries one. Exit 0 when every check passes, 2 when one fails.
"""
VERIFY_EPILOG = """\
examples:
  curl -s -D headers.txt localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d @request.json > response.json
  appliance receipt verify response.json --request request.json --response response.json
  grep -i x-appliance-receipt headers.txt > receipt.txt && appliance receipt verify receipt.txt
"""
REPLAY_DESCRIPTION = """\
Run a receipt's request again on this host, with the model from this store (it must have the
receipt's Merkle root), the same engine, thread count, context, GPU layers and seed, alone,
and compare the answer with the receipt's answer digest. Greedy decoding (temperature 0) and
seeded sampling on CPU with the same threads and llama.cpp build match; what can break that
(threads, parallel slots, GPUs) is printed as notes. The receipt is verified first, as
'appliance receipt verify' does. Exit 0 on a match, 2 on a mismatch.
"""
REPLAY_EPILOG = """\
example:
  appliance receipt replay response.json --request request.json --json
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    receipt = sub.add_parser(
        "receipt", parents=[common],
        help="verify or replay a signed inference receipt ('serve --receipts')",
        description="Signed inference receipts: verify one, or re-run its request here.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rs = receipt.add_subparsers(dest="receipt_command", metavar="SUBCOMMAND", required=True)
    verify = rs.add_parser("verify", parents=[common], help="check a receipt",
                           description=VERIFY_DESCRIPTION, epilog=VERIFY_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _receipt_args(verify)
    verify.add_argument("--request", type=Path, metavar="FILE",
                        help="the request body that was sent (its exact bytes)")
    verify.add_argument("--response", type=Path, metavar="FILE",
                        help="the response as received (JSON body, or the raw stream)")
    verify.set_defaults(func=run_verify)
    replay = rs.add_parser("replay", parents=[common], help="re-run a receipt's request here",
                           description=REPLAY_DESCRIPTION, epilog=REPLAY_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _receipt_args(replay)
    replay.add_argument("--request", type=Path, metavar="FILE", required=True,
                        help="the request body that was sent (its exact bytes)")
    replay.add_argument("--threads", type=int, metavar="N",
                        help="llama.cpp threads (default: the receipt's; another count may "
                             "change the answer)")
    replay.set_defaults(func=run_replay)


def _receipt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("receipt", type=Path, metavar="RECEIPT",
                        help="file with the receipt (JSON, header value, or a saved response)")
    parser.add_argument("--ca", type=Path, metavar="FILE",
                        help="the site CA certificate (default: ca.crt of the TLS directory)")
    parser.add_argument("--tls-dir", type=Path, metavar="DIR",
                        help="this host's TLS directory (default: the site config's tls_dir, "
                             "else STORE/tls)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """``appliance serve``'s receipt options (registered here so the serve parser stays small)."""
    group = parser.add_argument_group("receipts")
    group.add_argument("--receipts", action="store_true",
                       help="sign a receipt for every answer with this host's site key "
                            "(X-Appliance-Receipt header, a 'receipt' field; streamed: in the "
                            "last event)")
    group.add_argument("--receipt-tls-dir", type=Path, metavar="DIR",
                       help="the TLS directory whose site key signs receipts (default: the "
                            "site config's tls_dir, else STORE/tls)")
    group.add_argument("--audit-requests", action="store_true",
                       help="record each receipt's digests (never prompts or answers) in the "
                            "audit log, committed before the answer leaves (answers finishing "
                            "together share one commit); needs --receipts")


def serve_receipts(args: argparse.Namespace) -> ReceiptOptions | None:
    """The ReceiptOptions ``appliance serve`` was asked for, or None."""
    if args.audit_requests and not args.receipts:
        raise UsageError("--audit-requests records receipt digests: add --receipts")
    if not args.receipts:
        return None
    from appliance.serve.receipts import HostSigner, ReceiptOptions, store_lookup

    signer = HostSigner.from_tls_dir(_tls_dir(args.store, args.receipt_tls_dir))
    return ReceiptOptions(signer, store_lookup(args.store), audit_requests=args.audit_requests)


def _tls_dir(store: Path, given: Path | None) -> Path:
    from appliance.peer import site

    directory = site.tls_dir(store, site.site_config(store), given, insecure=False)
    assert directory is not None  # None only when insecure
    return directory


def _site_ca(args: argparse.Namespace) -> x509.Certificate:
    from appliance.peer import tls
    from appliance.receipts.verify import load_site_ca

    if args.ca is not None:
        return load_site_ca(args.ca)
    return load_site_ca(_tls_dir(args.store, args.tls_dir) / tls.CA_CERT)


def _read(path: Path | None, what: str) -> bytes | None:
    from appliance import fsutil
    from appliance.receipts.digests import MAX_RESPONSE_BYTES

    if path is None:
        return None
    return fsutil.read_capped(path, MAX_RESPONSE_BYTES, what, error=UsageError,
                              special=UsageError, too_big=UsageError)


def run_verify(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from appliance.cli.jsonout import print_json
    from appliance.receipts.verify import read_receipt, verify
    from appliance.store.location import require_existing_store

    require_existing_store(args.store)
    result = verify(read_receipt(args.receipt), _site_ca(args), args.store, datetime.now(UTC),
                    request=_read(args.request, "request file"),
                    response=_read(args.response, "response file"))
    if args.json:
        print_json(result.to_json())
        return EXIT_OK
    body = result.receipt.body
    print(f"receipt:   valid, signed by {body.host} (site CA sha256 {body.site_ca[:16]}...)")
    print(f"time:      {result.to_json()['time']}")
    print(f"model:     {body.model.ref} (root {body.model.merkle_root[:16]}..., signed bundle "
          f"{body.model.manifest[:16]}... under this store's trust root)")
    print(f"engine:    {body.engine.name}, {body.engine.build}, {body.engine.n_threads} threads, "
          f"{body.engine.parallel} slot(s), GPU layers {body.engine.gpu_layers}")
    print(f"seed:      {body.sampling.seed} ({body.sampling.seed_source})")
    print(f"request:   {'matches' if result.request_checked else 'not given (--request FILE)'}")
    print(f"response:  {'matches' if result.response_checked else 'not given (--response FILE)'}")
    return EXIT_OK


def run_replay(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from appliance.cli.jsonout import print_json
    from appliance.receipts.replay import replay
    from appliance.receipts.verify import read_receipt, verify
    from appliance.store.location import require_existing_store

    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    require_existing_store(args.store)
    receipt = read_receipt(args.receipt)
    request = _read(args.request, "request file")
    assert request is not None
    verify(receipt, _site_ca(args), args.store, datetime.now(UTC), request=request)
    report = replay(args.store, receipt, request, n_threads=args.threads)
    if args.json:
        print_json(report.to_json(receipt))
    else:
        verdict = "MATCH" if report.match else "MISMATCH"
        print(f"replay:    {verdict} ({receipt.body.model.ref}, {receipt.body.engine.name}, "
              f"{report.seconds:.1f} s)")
        print(f"receipt:   answer sha256 {report.expected}")
        print(f"this host: answer sha256 {report.replayed}")
        for note in report.notes:
            print(f"note:      {note}")
    return EXIT_OK if report.match else EXIT_REFUSED
