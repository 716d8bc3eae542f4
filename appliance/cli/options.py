"""Checks of command-line options that several commands share (the library decides the rule,
this module only maps options to it)."""

from __future__ import annotations

import argparse

from appliance.errors import UsageError
from appliance.store.trust_state import require_override_reason


def override_options(args: argparse.Namespace) -> tuple[bool, str | None]:
    """(allow_expired, reason) of a command with --allow-expired and --reason TEXT."""
    if args.reason is not None and not args.allow_expired:
        raise UsageError("--reason goes with --allow-expired")
    require_override_reason(args.allow_expired, args.reason)
    return bool(args.allow_expired), args.reason

