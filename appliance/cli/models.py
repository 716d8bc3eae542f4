"""``appliance models list|show|rm|export``: what the store holds, in detail, removing it, and
handing a verified model to Ollama or to plain files (``appliance.store.export``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli import jsonout
from appliance.cli.jsonout import print_json
from appliance.store.layout import human_bytes
from appliance.store.location import require_existing_store

if TYPE_CHECKING:
    from appliance.format.trust import TrustRoot
    from appliance.store.records import ModelRecord

LIST_DESCRIPTION = """\
List the models in the store: name, version, size, whether every file is verified, the
channel and sequence of the signed bundle it came from, and when it was imported. Models
still being imported are not listed (nothing half-written is ever shown or served).
--json prints an array of objects with at least name, version, size and verified.
"""
LIST_EPILOG = """\
examples:
  appliance models list
  appliance models list --json | jq -r '.[] | select(.verified) | .name'
"""
SHOW_DESCRIPTION = """\
Everything known about one model: license, provenance (builder, upstream sources and their
sha256), the signers of its bundle, channel and sequence, GGUF facts, each file with its size,
Merkle root, whole-file BLAKE3 and location, the verified state and the import time.
NAME is the model name, or NAME:VERSION when several versions are stored.
"""
SHOW_EPILOG = """\
examples:
  appliance models show gemma3-270m
  appliance models show gemma3-270m:q4_k_m --json
"""
RM_DESCRIPTION = """\
Remove a model from the store: the index forgets it first, then its files are deleted (a crash
in between leaves files that 'appliance store gc' removes). The removal is recorded in the audit
log. Quarantined copies under quarantine/ are kept.
"""
RM_EPILOG = """\
example:
  appliance models rm gemma3-270m:q4_k_m
"""
EXPORT_DESCRIPTION = """\
Hand a verified model to the tools the site already runs. Every byte written is checked on
the way against the signed manifest's chunk hashes and the file's recorded BLAKE3; a model
that is quarantined or changed is refused (exit 2), nothing of it is left behind, and the
refusal is audited. Each export is recorded in the audit log.

--ollama DIR writes into an Ollama model store (DIR is what OLLAMA_MODELS names, by default
~/.ollama/models): the GGUF and its config, template and params as blobs/sha256-<hex>, then the
manifest manifests/<host>/<namespace>/<model>/<tag> last, so Ollama never lists a model whose
blobs are not all there. A model built from an ollama: recipe source goes back under its
Ollama name with its template and parameters; any other model is named <name>:<version>
(--name to choose) and Ollama uses the chat template in its GGUF. A different model already
under that name is refused unless --replace; the same one is left as it is.

--dir DIR writes the model's files into a new or empty directory, with SHA256SUMS that
'sha256sum -c SHA256SUMS' checks from inside DIR. A new DIR is assembled next to it and renamed
into place when complete; in an empty one (a mounted disk) SHA256SUMS is written last.
"""
EXPORT_EPILOG = """\
examples:
  appliance models export gemma3-270m --ollama ~/.ollama/models
  appliance models export acme/tiny:q4_k_m --ollama /srv/ollama --name tiny:q4
  appliance models export gemma3-270m --dir /mnt/share/gemma && \\
      (cd /mnt/share/gemma && sha256sum -c SHA256SUMS)
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "models",
        parents=[common],
        help="list, show and remove the models in the store",
        description="The models in this host's store.",
        epilog="examples:\n  appliance models list\n  appliance models show gemma3-270m\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[common],
            help=help_,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    listing = add("list", "list the stored models", LIST_DESCRIPTION, LIST_EPILOG)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=run_list)
    show = add("show", "show one model in detail", SHOW_DESCRIPTION, SHOW_EPILOG)
    show.add_argument("name", metavar="NAME", help="NAME or NAME:VERSION")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=run_show)
    rm = add("rm", "remove a model and its files", RM_DESCRIPTION, RM_EPILOG)
    rm.add_argument("name", metavar="NAME", help="NAME or NAME:VERSION")
    rm.set_defaults(func=run_rm)
    export = add("export", "write a verified model for Ollama or as plain files",
                 EXPORT_DESCRIPTION, EXPORT_EPILOG)
    export.add_argument("name", metavar="NAME", help="NAME or NAME:VERSION")
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--ollama", type=Path, metavar="DIR",
                       help="an Ollama model store (its OLLAMA_MODELS directory)")
    where.add_argument("--dir", type=Path, metavar="DIR",
                       help="a new or empty directory for the files and SHA256SUMS")
    export.add_argument("--name", dest="ollama_name", metavar="NAME[:TAG]",
                        help="the name in Ollama (with --ollama)")
    export.add_argument("--replace", action="store_true",
                        help="overwrite a different model of that name (with --ollama)")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(func=run_export)


def _verified(model: ModelRecord) -> str:
    return "[green]yes[/]" if model.verified else "[bold red]NO (quarantined)[/]"


def model_json(model: ModelRecord, roots: list[TrustRoot]) -> dict[str, Any]:
    """A model record in the JSON form every command uses: times with Z, signers as keys."""
    value = jsonout.times(model.to_json(), "started_at", "imported_at", "verified_at")
    value["signers"] = jsonout.signers(model.signers, roots)
    value["files"] = [jsonout.times(f, "verified_at") for f in value["files"]]
    return value


def _roots(store: Path) -> list[TrustRoot]:
    from appliance.store import trust_state
    return [s.root for s in trust_state.installed_chain(store)]


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from appliance.store.records import list_models
    require_existing_store(args.store)
    models = list_models(args.store)
    if args.json:
        roots = _roots(args.store)
        print_json([model_json(m, roots) for m in models])
        return 0
    console = Console()
    if not models:
        console.print(f"no models in {args.store}")
        return 0
    table = Table(title=f"models in {args.store}")
    for column in ("name", "version", "size", "verified", "channel #seq", "imported (UTC)"):
        table.add_column(column, no_wrap=True)
    for m in models:
        table.add_row(
            m.name,
            m.version,
            human_bytes(m.size),
            _verified(m),
            f"{m.channel} #{m.sequence}",
            (m.imported_at or "-")[:16].replace("T", " "),
        )
    console.print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.store.records import find_model
    require_existing_store(args.store)
    model = find_model(args.store, args.name)
    if args.json:
        print_json(model_json(model, _roots(args.store)))
        return 0
    console = Console(highlight=False)
    console.print(f"[bold]{model.name}[/] {model.version}  ({human_bytes(model.size)})")
    console.print(f"  verified     {_verified(model)} (last verified {model.verified_at or '-'})")
    console.print(f"  license      {model.license}")
    console.print(
        f"  bundle       channel {model.channel} #{model.sequence}, manifest {model.manifest_hash}"
    )
    console.print(f"  signers      {', '.join(model.signers) or '-'}")
    console.print(f"  imported     {model.imported_at or '-'} (started {model.started_at})")
    prov = model.provenance
    console.print(f"  builder      {prov.get('builder', '-')}")
    for source in prov.get("sources", []):
        console.print(
            f"  source       {source.get('path')}: {source.get('source')} "
            f"sha256 {source.get('sha256')}"
        )
    for key, value in (model.gguf or {}).items():
        console.print(f"  gguf {key:<18} {value}")
    for f in model.files:
        console.print(f"  file         {f.path}  {human_bytes(f.size)}  [{f.state}]")
        console.print(f"               merkle {f.merkle_root}")
        console.print(f"               blake3 {f.blake3 or '-'}")
        where = f.quarantine_path if f.state == "quarantined" else f.location
        console.print(f"               at {where or '-'}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.store.removal import remove_model
    require_existing_store(args.store)
    model = remove_model(args.store, args.name)
    Console(highlight=False).print(f"removed {model.ref} ({human_bytes(model.size)})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.cli.store import byte_progress
    from appliance.errors import UsageError
    from appliance.store.export import export_dir, export_ollama
    require_existing_store(args.store)
    if args.dir is not None and (args.ollama_name or args.replace):
        raise UsageError("--name and --replace go with --ollama, not --dir")
    with byte_progress("exporting", enabled=not args.json) as progress:
        if args.ollama is not None:
            result = export_ollama(args.store, args.name, args.ollama.expanduser(),
                                   name=args.ollama_name, replace=args.replace,
                                   progress=progress)
        else:
            result = export_dir(args.store, args.name, args.dir.expanduser(),
                                progress=progress)
    if args.json:
        print_json(result.to_json())
        return 0
    console = Console(highlight=False)
    if result.ollama_name is not None:
        state = "already there, unchanged" if result.unchanged else "written"
        console.print(f"exported {result.model} to the Ollama store {result.target} as "
                      f"[bold]{result.ollama_name}[/] ({state}, {human_bytes(result.bytes)})")
        console.print(f"  manifest {result.manifest_digest}")
        if result.left_out:
            console.print(f"  not for Ollama, left out: {', '.join(result.left_out)}")
        console.print(f"  run it:  OLLAMA_MODELS={result.target} ollama run {result.ollama_name}")
    else:
        console.print(f"exported {result.model} to {result.target} ({len(result.files)} "
                      f"files, {human_bytes(result.bytes)})")
        console.print(f"  check it:  cd {result.target} && sha256sum -c SHA256SUMS")
    return 0
