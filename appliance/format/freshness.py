"""Freshness rules: a channel's sequence only goes up (rollback), and nothing signed is used
past its expiry unless the operator overrides it (freeze).

Pure, like the rest of ``appliance.format``: the caller passes the high-water mark it keeps
(``appliance.store.trust_state``) and ``now`` (timezone-aware); these functions hold no state
and read no clock. They know nothing of keys: ``appliance.format.trust`` applies
``check_expiry`` to trust roots, ``appliance.authenticate`` to manifests. The refusals are
``RollbackError`` and ``ExpiredError``; an allowed override returns True so the caller audits it.
"""

from __future__ import annotations

from datetime import datetime

from appliance.errors import ExpiredError, RollbackError
from appliance.format.fields import format_timestamp
from appliance.limits import MAX_SEQUENCE


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is None:
        raise TypeError("datetimes passed to appliance.format.freshness must be timezone-aware")


def check_rollback(
    previous: tuple[int, str] | None,
    sequence: int,
    manifest_hash: str,
    *,
    channel: str | None = None,
) -> None:
    """Sequences only go up per channel; the same one again only with the same manifest."""
    where = f"channel {channel!r}" if channel else "this channel"
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not (
        0 <= sequence <= MAX_SEQUENCE
    ):
        raise RollbackError(f"sequence {sequence!r} on {where} is not a valid sequence number")
    if previous is None:
        return
    seen_sequence, seen_hash = previous
    if sequence < seen_sequence:
        raise RollbackError(
            f"{where}: sequence {sequence} is older than {seen_sequence}, the highest this "
            f"store has accepted (rollback refused)"
        )
    if sequence == seen_sequence and manifest_hash != seen_hash:
        raise RollbackError(
            f"{where}: sequence {sequence} was already accepted with another manifest "
            f"({seen_hash}, now {manifest_hash}); a publisher must raise the sequence"
        )


def check_expiry(
    what: str,
    expires: datetime,
    now: datetime,
    allow_expired: bool,
    *,
    created: datetime | None = None,
) -> bool:
    """ExpiredError when ``now >= expires``; with ``allow_expired``, True so the caller audits."""
    _require_aware(expires)
    _require_aware(now)
    if now < expires:
        return False
    if allow_expired:
        return True
    issued = f" (issued {format_timestamp(created)})" if created is not None else ""
    raise ExpiredError(
        f"{what} expired at {format_timestamp(expires)}{issued}; this host's clock says "
        f"{format_timestamp(now)}. If the clock is wrong, correct it; to accept it anyway pass "
        f"--allow-expired with a reason (recorded in the audit log)"
    )
